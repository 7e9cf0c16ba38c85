"""The report's view of the data: options and their statistics (fewtune.options) and how numbers print
(fewtune.fmt), re-exported for the report's modules."""

from __future__ import annotations

from ..fmt import (METRIC_NAMES, PERCENT, interval, mib, num, params, pct, scale_for, seconds,  # noqa: F401
                   signed, size, value, with_interval)
from ..options import (COST_KEYS, COST_KIND, alike, flat_row, group_runs, majority_class,  # noqa: F401
                       measured_alike, model_order, option_estimate, paired, predictions_reader, primary_metric, split_roles, variant_of, versus_majority)
