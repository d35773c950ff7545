"""paratransfer: parametric knowledge transfer between LLMs."""
__version__ = "0.1.0"

from paratransfer.io.moved import install as _install_moved_paths  # noqa: E402

_install_moved_paths()
