"""nsfw: a per-application network firewall built from network namespaces and nftables."""

__version__ = "0.1.0"
