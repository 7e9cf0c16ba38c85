"""The report's view of the data: options and their statistics (fewtune.stats.options) and how numbers print
(fewtune.stats.fmt), re-exported for the report's modules."""

from __future__ import annotations

from ..stats.fmt import (  # noqa: F401
                   METRIC_NAMES,
                   PERCENT,
                   interval,
                   mib,
                   num,
                   params,
                   pct,
                   scale_for,
                   seconds,
                   signed,
                   size,
                   value,
                   with_interval,
)
from ..stats.options import (  # noqa: F401
                   COST_KEYS,
                   COST_KIND,
                   alike,
                   flat_row,
                   group_runs,
                   majority_class,
                   measured_alike,
                   model_order,
                   option_estimate,
                   paired,
                   predictions_reader,
                   primary_metric,
                   split_roles,
                   variant_of,
                   versus_majority,
)
