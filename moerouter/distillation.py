"""Old path of :mod:`moerouter.methods.distillation`, kept: ``mr.distillation`` is public.

``import moerouter.distillation`` and ``from moerouter.distillation import ...`` (the public
path spelled as an import) keep working without a warning: this module replaces itself with the
new one, so both paths give the same module object. New code imports from
:mod:`moerouter.methods.distillation`.
"""

import sys

from moerouter.methods import distillation as _moved

sys.modules[__name__] = _moved
