"""Old path of :mod:`moerouter.methods.multitask`, kept: ``mr.multitask`` is public.

``import moerouter.multitask`` and ``from moerouter.multitask import ...`` (the public path
spelled as an import) keep working without a warning: this module replaces itself with the new
one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.multitask`.
"""

from moerouter._moved import replace_module
from moerouter.methods import multitask

replace_module(__name__, multitask, deprecated=False)
