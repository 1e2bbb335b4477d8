"""Transfer-round properties on real MPI ranks under mpiexec (cases in tests/mpi/transfer_props.py).

Each test starts the ranks once and runs several cases, because rank start-up (torch, data) costs
more than the cases themselves.
"""

import pytest

from conftest import mpi_script

pytestmark = pytest.mark.mpi


def test_transfer_properties_on_two_ranks():
    """average = exact mean everywhere; best adopts the clearly better model and only it; decisions
    follow independently computed scores; blocks outside the patterns never change."""
    mpi_script(2, "transfer_props.py", "average", "best_known", "best_scores=0.0",
               "blocks_outside_patterns_never_change")


def test_transfer_properties_on_four_ranks():
    mpi_script(4, "transfer_props.py", "average", "best_known", "best_scores=0.0", "best_scores=0.05")
