"""The repository's top folder, installed as ``mlx_diffgemma.command``: it holds ``cli.py``,
the ``mlx-diffgemma`` command, so that installing claims no generic top-level module name."""
