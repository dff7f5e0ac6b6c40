"""Tuned kernel configs (data only), installed as the package ``moe.configs``. See configs/README.md."""
