"""The runtime: the DeepSpeed loop, the rendezvous, the launcher, models and adapters, threads."""
