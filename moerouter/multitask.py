"""Old path of :mod:`moerouter.methods.multitask`, kept: ``mr.multitask`` is public.

``import moerouter.multitask`` and ``from moerouter.multitask import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.multitask`.
"""

import sys

from moerouter.methods import multitask as _moved

sys.modules[__name__] = _moved
