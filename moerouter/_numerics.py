"""Former home of the argument checks and stable primitives of the method modules.

They now live in :mod:`moerouter._validation` (checks), :mod:`moerouter._agnostic.scores`
(sigmoid, log-sigmoid, softplus, log-softmax) and :mod:`moerouter._agnostic.select`
(:func:`pick_columns`); the names stay importable from here for code written against the
earlier layout.
"""

from moerouter._agnostic.scores import log_sigmoid, log_softmax, sigmoid, softplus
from moerouter._agnostic.select import pick_columns
from moerouter._typing import Array
from moerouter._validation import (
    bool_array,
    check_array,
    check_real,
    check_shape,
    class_labels,
    float_array,
    namespace,
)

__all__ = [
    "Array",
    "bool_array",
    "check_array",
    "check_real",
    "check_shape",
    "class_labels",
    "float_array",
    "log_sigmoid",
    "log_softmax",
    "namespace",
    "pick_columns",
    "sigmoid",
    "softplus",
]
