from .kto_bco import *  # noqa: F401,F403
from .kto_bco import __all__  # noqa: F401
