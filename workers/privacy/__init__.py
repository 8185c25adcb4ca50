"""PATE: noisy vote aggregation (``aggregation``) and its privacy accounting.

Two analyses, each with a data-independent bound (a function of the noise and the
number of answered queries only) and a data-dependent one (which also reads the vote
counts, and is far smaller when the teachers agree):

- LNMax, the moments accountant of Papernot et al. 2017 (arXiv 1610.05755, Section 3
  and Appendix): log moments alpha(l) summed over queries, then
  eps = min_l (sum alpha(l) - ln delta) / l over the integer moments l = 1..8.
- GNMax and Confident-GNMax, the Renyi DP analysis of Papernot et al. 2018 (arXiv
  1802.08908): RDP of order lambda summed over queries, then
  eps = min_lambda (sum RDP(lambda) + ln(1 / delta) / (lambda - 1)).

A data-dependent eps depends on the private votes, so publishing it as is leaks
information; the 2018 paper releases it through smooth sensitivity, which is not
implemented here. Use it to compare and tune, and report the data-independent eps or a
sanitised one.

The accountants take vote counts as anything ``numpy.asarray`` takes (numpy arrays,
nested lists) or a torch tensor on any device, shaped ``(queries, classes)``.

Modules: ``aggregation`` (vote counts, LNMax, GNMax, Confident-GNMax; imports torch),
``lnmax_accounting``, ``gnmax_accounting``, ``spent`` (``PrivacySpent``) and ``checks``
(the argument checks they share). The accounting names are re-exported here.
"""

from gauntlet.workers.privacy import gnmax_accounting, lnmax_accounting
from gauntlet.workers.privacy.gnmax_accounting import *  # noqa: F403
from gauntlet.workers.privacy.lnmax_accounting import *  # noqa: F403
from gauntlet.workers.privacy.spent import PrivacySpent

__all__ = ["PrivacySpent", *gnmax_accounting.__all__, *lnmax_accounting.__all__]
