"""Old path of :mod:`moerouter.methods.distillation`, kept: ``mr.distillation`` is public.

``import moerouter.distillation`` and ``from moerouter.distillation import ...`` (the public
path spelled as an import) keep working without a warning: this module replaces itself with the
new one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.distillation`.
"""

from moerouter._moved import replace_module
from moerouter.methods import distillation

replace_module(__name__, distillation, deprecated=False)
