#!/bin/bash
# Re-records the rulesets tests/unit/test_doctor.py reads: each scenario is loaded into a throwaway network
# namespace (`unshare --net`, so the machine's own ruleset is never touched) with the tool the real product uses
# (iptables-nft-restore for Docker's and ufw's iptables rules, nft -f for firewalld's and nftables.conf's), and
# `nft -j list ruleset` is written to NAME.json. The rules are those the products install by default: Docker
# 24-27 (one container publishing a port), ufw 0.36 enabled with its defaults (/usr/share/ufw/*.rules), firewalld
# 1.3's nftables backend with eth0 in the default zone `public`. Run as root from this directory.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

record() {  # record NAME: stdin is a shell script run inside a fresh network namespace. iptables-nft's rules
    # also go to NAME.iptables-nft.txt / NAME.ip6tables-nft.txt: the JSON shows their xt matches without arguments
    unshare --net bash -euo pipefail -s > "$1.json.tmp" <<<"$(cat)"$'\n'"nft -j list ruleset
        if nft list table ip filter >/dev/null 2>&1; then iptables-nft -S > $1.iptables-nft.txt; fi
        if nft list table ip6 filter >/dev/null 2>&1; then ip6tables-nft -S > $1.ip6tables-nft.txt; fi"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); json.dump(d, open(sys.argv[1][:-4], "w"), indent=1)' "$1.json.tmp"
    rm -f "$1.json.tmp"
    echo "recorded $1.json"
}

docker_v4='*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT'
docker_v6='*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT'
docker_fix='iptables-nft -I DOCKER-USER -i nsfw+ -j ACCEPT
iptables-nft -I DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
ip6tables-nft -I DOCKER-USER -i nsfw+ -j ACCEPT
ip6tables-nft -I DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT'

record docker <<<"iptables-nft-restore <<'X'
$docker_v4
X
ip6tables-nft-restore <<'X'
$docker_v6
X"
record docker-fixed <<<"iptables-nft-restore <<'X'
$docker_v4
X
ip6tables-nft-restore <<'X'
$docker_v6
X
$docker_fix"
# The same Docker rules as iptables-legacy shows them (`iptables-legacy -S`), for the legacy parser.
printf '%s\n' "$docker_v4" | sed -n '/^\*filter/,/^COMMIT/p' | python3 -c '
import sys
for line in sys.stdin:
    line = line.rstrip("\n")
    if line.startswith(":"):
        name, policy = line[1:].split()[:2]
        print(f"-P {name} {policy}" if policy != "-" else f"-N {name}")
    elif line.startswith("-A"):
        print(line)' > docker-legacy.txt
echo "recorded docker-legacy.txt"

# ufw 0.36 enabled with its defaults: incoming deny, outgoing allow, routed (forward) deny, logging low.
ufw_chains() {  # ufw_chains PREFIX (ufw | ufw6)
    local p=$1
    for c in after-forward after-input after-logging-forward after-logging-input after-logging-output \
             after-output before-forward before-input before-logging-forward before-logging-input \
             before-logging-output before-output logging-allow logging-deny reject-forward reject-input \
             reject-output skip-to-policy-forward skip-to-policy-input skip-to-policy-output track-forward \
             track-input track-output user-forward user-input user-limit user-limit-accept \
             user-logging-forward user-logging-input user-logging-output user-output; do
        echo ":$p-$c - [0:0]"
    done
    [ "$p" = ufw ] && echo ":ufw-not-local - [0:0]"
    for h in input forward output; do
        for s in before-logging before after after-logging reject track; do
            echo "-A ${h^^} -j $p-$s-$h"
        done
    done
    echo "-A $p-after-logging-forward -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix \"[UFW BLOCK] \""
    echo "-A $p-after-logging-input -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix \"[UFW BLOCK] \""
    echo "-A $p-logging-allow -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix \"[UFW ALLOW] \""
    echo "-A $p-logging-deny -m conntrack --ctstate INVALID -m limit --limit 3/min --limit-burst 10 -j RETURN"
    echo "-A $p-logging-deny -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix \"[UFW BLOCK] \""
    echo "-A $p-skip-to-policy-forward -j DROP"
    echo "-A $p-skip-to-policy-input -j DROP"
    echo "-A $p-skip-to-policy-output -j ACCEPT"
    echo "-A $p-track-output -p tcp -m conntrack --ctstate NEW -j ACCEPT"
    echo "-A $p-track-output -p udp -m conntrack --ctstate NEW -j ACCEPT"
    echo "-A $p-user-limit -m limit --limit 3/min -j LOG --log-prefix \"[UFW LIMIT BLOCK] \""
    echo "-A $p-user-limit -j REJECT"
    echo "-A $p-user-limit-accept -j ACCEPT"
    echo "-A $p-before-forward -j $p-user-forward"
    echo "-A $p-before-input -j $p-user-input"
    echo "-A $p-before-output -j $p-user-output"
}
ufw_rules() {  # ufw_rules FAMILY(4|6) EXTRA-RULES: before/after rules from the ufw package, then ufw's own
    local p=ufw v=""; [ "$1" = 6 ] && { p=ufw6; v=6; }
    echo "*filter"
    echo ":INPUT DROP [0:0]"
    echo ":FORWARD DROP [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    ufw_chains $p | grep '^:'
    # ufw's before*.rules / after*.rules (without their own *filter/COMMIT and chain lines)
    sed -e '/^#/d' -e '/^$/d' -e '/^\*filter/d' -e '/^COMMIT/d' -e '/^:/d' "ufw/before$v.rules" "ufw/after$v.rules" |
        grep -v -e "-j $p-user-input\$"
    ufw_chains $p | grep -v '^:'
    printf '%s\n' "$2"
    echo "COMMIT"
}
ufw_fix4='-A ufw-user-forward -i nsfw+ -j ACCEPT
-A ufw-user-input -i nsfw+ -p tcp --dport 53 -j ACCEPT
-A ufw-user-input -i nsfw+ -p udp --dport 53 -j ACCEPT'
ufw_fix6="${ufw_fix4//ufw-/ufw6-}"
record ufw <<<"iptables-nft-restore <<'X'
$(ufw_rules 4 '')
X
ip6tables-nft-restore <<'X'
$(ufw_rules 6 '')
X"
record ufw-fixed <<<"iptables-nft-restore <<'X'
$(ufw_rules 4 "$ufw_fix4")
X
ip6tables-nft-restore <<'X'
$(ufw_rules 6 "$ufw_fix6")
X"

# iptables-nft with nothing but a FORWARD policy of DROP (what the integration test builds with nft itself)
record iptables-nft <<<"iptables-nft -P FORWARD DROP"

# /etc/nftables.conf of a host that forwards only replies (a common hardening)
record nftables-conf <<<"nft -f - <<'X'
table inet filter {
	chain input { type filter hook input priority filter; policy accept; }
	chain forward { type filter hook forward priority filter; policy drop; ct state established,related accept; }
	chain output { type filter hook output priority filter; policy accept; }
}
X"

record firewalld <<<"nft -f firewalld.nft"

# nsfw's own tables (a sandbox and the guard) next to Debian's default /etc/nftables.conf: nothing to report
record clean <<<"nft -f - <<'X'
table inet filter {
	chain input { type filter hook input priority filter; }
	chain forward { type filter hook forward priority filter; }
	chain output { type filter hook output priority filter; }
}
X
cd ../../.. && /usr/bin/python3 -c '
from nsfw import compile as c, nft
from nsfw.names import Instance
from nsfw.profile import Profile, Rule
nft.apply(c.host_ruleset(Instance(\"1a2b3c4d\", 0, ipv6=True), Profile(name=\"p\", path=\"\", allow=(Rule(\"zone\", \"internet\"),))))
nft.apply(c.guard_ruleset())'"
