# Two commands set up a fresh Debian 12 machine: `make demo` and `make test` (as root). Each installs what is
# missing first, so neither depends on what happened to be installed by hand.
PYTHON      := /usr/bin/python3
PREFIX      ?= /usr/local
LIBDIR      := $(PREFIX)/lib/nsfw
APT_RUNTIME := nftables python3-nftables python3-pyroute2 python3-click python3-yaml iproute2 util-linux procps
APT_RUNTIME += sudo
APT_TEST    := python3-pytest python3-venv python3-jsonschema
APT_TEST    += desktop-file-utils xvfb x11-apps x11-utils xauth mandoc zsh fish
# bench/: the anchors (firejail, bubblewrap, dnsmasq, dnsperf, iperf3), the C load generators (gcc), and what the
# NFQUEUE baseline's netfilterqueue builds against (pip, into BENCH_VENV)
APT_BENCH   := firejail bubblewrap dnsmasq-base dnsperf iperf3 iptables gcc libc6-dev
APT_BENCH   += libnetfilter-queue-dev python3-dev python3-venv
BENCH_VENV  := .venv-bench
BENCH_PIP   := netfilterqueue==1.1.0
BENCH_ARGS  ?=
DEV_VENV    := .venv-dev
DEV_TOOLS   := ruff==0.8.6 mypy==1.13.0 types-PyYAML

.PHONY: all deps test-deps demo test unit lint bench install uninstall clean

all: test

# Installs only when something is missing: `apt-get update` runs at most once, and not at all on a ready machine.
define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

deps:
	$(call apt_ensure,$(APT_RUNTIME))

test-deps: deps
	$(call apt_ensure,$(APT_TEST))
	@[ -x $(DEV_VENV)/bin/ruff ] && [ -x $(DEV_VENV)/bin/mypy ] || { \
		$(PYTHON) -m venv --system-site-packages $(DEV_VENV) && \
		$(DEV_VENV)/bin/pip install -q $(DEV_TOOLS); }

demo: deps
	./bin/nsfw demo

lint: test-deps
	$(DEV_VENV)/bin/ruff check nsfw tests bench
	$(DEV_VENV)/bin/mypy nsfw

# Every test: unit tests, then integration tests that build their own simulated world of namespaces (root).
test: test-deps lint
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

unit: test-deps
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/unit

# Every benchmark, each in a simulated world of its own; one table of the goals. BENCH_ARGS="--quick" for a smoke
# test, "--only datapath,ruleset" for some, "--readme" to put the table into bench/README.md.
bench: deps
	$(call apt_ensure,$(APT_BENCH))
	@$(BENCH_VENV)/bin/python3 -c 'import netfilterqueue' 2>/dev/null || { \
		$(PYTHON) -m venv --system-site-packages $(BENCH_VENV) && \
		$(BENCH_VENV)/bin/pip install -q $(BENCH_PIP); }
	$(PYTHON) bench/run.py $(BENCH_ARGS)

install: deps
	install -d $(LIBDIR)/nsfw/resolver $(LIBDIR)/nsfw/doctor $(LIBDIR)/nsfw/worldlib $(LIBDIR)/bin $(LIBDIR)/profiles \
		$(PREFIX)/bin /etc/nsfw/profiles
	install -m 0644 nsfw/*.py $(LIBDIR)/nsfw/
	install -m 0644 nsfw/resolver/*.py $(LIBDIR)/nsfw/resolver/
	install -m 0644 nsfw/doctor/*.py $(LIBDIR)/nsfw/doctor/
	install -m 0644 nsfw/worldlib/*.py $(LIBDIR)/nsfw/worldlib/
	install -m 0755 bin/nsfw $(LIBDIR)/bin/nsfw
	install -m 0644 profiles/*.yaml $(LIBDIR)/profiles/
	ln -sf $(LIBDIR)/bin/nsfw $(PREFIX)/bin/nsfw
	@# nsfw-gc.timer: where systemd is the init system; enabled and started only while systemd runs
	@if [ -d /run/systemd/system ] || [ -d /lib/systemd/system ]; then \
		install -d $(PREFIX)/lib/systemd/system && \
		for u in nsfw-gc.service nsfw-gc.timer nsfw-warm.service; do \
			sed 's|/usr/local/bin/nsfw|$(PREFIX)/bin/nsfw|' systemd/$$u > $(PREFIX)/lib/systemd/system/$$u && \
			chmod 0644 $(PREFIX)/lib/systemd/system/$$u || exit 1; \
		done; \
	fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload && systemctl enable --now nsfw-gc.timer && \
		systemctl enable nsfw-warm.service && systemctl restart nsfw-warm.service; fi
	@# desktop: the launcher that wrapped menu entries run, and group nsfw, whose members may run `nsfw run`
	@# through sudo without a password (desktop-wrappers/nsfw.sudoers; checked by visudo before it goes live)
	install -d $(LIBDIR)/desktop-wrappers
	install -m 0755 desktop-wrappers/nsfw-launch $(LIBDIR)/desktop-wrappers/nsfw-launch
	ln -sf $(LIBDIR)/desktop-wrappers/nsfw-launch $(PREFIX)/bin/nsfw-launch
	getent group nsfw >/dev/null || groupadd --system nsfw
	sed 's|@NSFW@|$(PREFIX)/bin/nsfw|' desktop-wrappers/nsfw.sudoers > /etc/sudoers.d/.nsfw.new
	visudo -cf /etc/sudoers.d/.nsfw.new || { rm -f /etc/sudoers.d/.nsfw.new; exit 1; }
	chmod 0440 /etc/sudoers.d/.nsfw.new && mv -f /etc/sudoers.d/.nsfw.new /etc/sudoers.d/nsfw
	@# man pages, and shell completion (click's scripts from completion/; profile names complete)
	install -d $(MANDIR)/man1 $(MANDIR)/man5 $(BASHCOMPDIR) $(ZSHCOMPDIR) $(FISHCOMPDIR)
	install -m 0644 man/nsfw.1 man/nsfw-launch.1 $(MANDIR)/man1/
	install -m 0644 man/nsfw-profile.5 $(MANDIR)/man5/nsfw-profile.5
	install -m 0644 completion/nsfw.bash $(BASHCOMPDIR)/nsfw
	install -m 0644 completion/nsfw.zsh $(ZSHCOMPDIR)/_nsfw
	install -m 0644 completion/nsfw.fish $(FISHCOMPDIR)/nsfw.fish

uninstall:
	rm -rf $(LIBDIR) $(PREFIX)/bin/nsfw
	rm -f /etc/sudoers.d/nsfw $(PREFIX)/bin/nsfw-launch
	@echo "group nsfw is kept (its members were added by hand): groupdel nsfw removes it"
	@if [ -d /run/systemd/system ]; then systemctl disable --now nsfw-gc.timer nsfw-warm.service 2>/dev/null || true; fi
	rm -f $(PREFIX)/lib/systemd/system/nsfw-gc.service $(PREFIX)/lib/systemd/system/nsfw-gc.timer \
		$(PREFIX)/lib/systemd/system/nsfw-warm.service
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	rm -f $(MANDIR)/man1/nsfw.1 $(MANDIR)/man1/nsfw-launch.1 $(MANDIR)/man5/nsfw-profile.5
	rm -f $(BASHCOMPDIR)/nsfw $(ZSHCOMPDIR)/_nsfw $(FISHCOMPDIR)/nsfw.fish

clean:
	rm -rf $(DEV_VENV) .mypy_cache .ruff_cache .pytest_cache bench/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Where `make install` puts man pages and completion: the directories man, bash-completion, zsh and fish read
# under PREFIX (zsh reads vendor-completions under /usr, site-functions under /usr/local).
MANDIR      := $(PREFIX)/share/man
BASHCOMPDIR := $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  := $(PREFIX)/share/zsh/$(if $(filter /usr,$(PREFIX)),vendor-completions,site-functions)
FISHCOMPDIR := $(PREFIX)/share/fish/vendor_completions.d

# The Debian package, built with dpkg-deb from a staging tree (packaging/build-deb): build/nsfw_VERSION_all.deb.
# tests/integration/test_deb.py installs it, runs `nsfw demo` from it and purges it.
.PHONY: deb
deb:
	packaging/build-deb build
