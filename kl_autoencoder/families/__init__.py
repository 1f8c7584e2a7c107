"""Thin adapters, one file per autoencoder family, behind `kl_autoencoder.interface`; `load_autoencoder` picks one."""
