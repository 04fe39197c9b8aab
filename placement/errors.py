"""The one error the planner raises for bad or infeasible input.

Every user-facing failure of the placement package (missing or malformed file, a model that fits no
configuration, SLOs that nothing meets, an empty trace) is a `PlanningError` whose message is one
line that names the file, field or constraint at fault. `placement.cli.run` turns it into exit code 2.
"""


class PlanningError(Exception):
    """Bad input or infeasible planning problem; the message is one human-readable line."""
