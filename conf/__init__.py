"""grads' Hydra configs. Installed, this folder is the package ``grads.conf`` (setup.cfg maps it),
so the configs travel inside the wheel and Hydra also finds them as ``pkg://grads.conf``."""
