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
               "blocks_outside_patterns_never_change", "distill_teacher_is_the_peers_mean_logits_on_own_training_samples",
               "gradual_average_pulls_by_the_rate")


def test_transfer_properties_on_four_ranks():
    """The unseen rule judges each pair on the intersection of their validation sets, and makes no
    comparison on fewer than transfer.min_samples (400: more than any intersection here); with
    transfer.candidates each task scores only the peers drawn for it."""
    mpi_script(4, "transfer_props.py", "average", "best_known", "best_scores=0.0", "best_scores=0.05",
               "unseen_compares_on_samples_neither_lineage_trained_on=1",
               "unseen_compares_on_samples_neither_lineage_trained_on=400",
               "keep_lineages_refuses_the_smallest_gains_that_would_leave_too_few",
               "candidates_scores_only_the_drawn_peers=1", "candidates_scores_only_the_drawn_peers=2",
               "distill_teacher_is_the_peers_mean_logits_on_own_training_samples")


def test_exchange_properties_on_three_ranks(tmp_path):
    """Buffers and their metadata travel in one frame bit for bit (metadata longer than the header
    too); a paired exchange delivers exactly the drawn peers; a streamed buffer can be fetched again
    by the tasks that name it; sums are the task-order float64 sum
    and means the task-order float32 mean, bit-equal to the file backend's, on uneven segments and
    sizes below K."""
    mpi_script(3, "comm_props.py", tmp_path, "candidates_carry_bits_and_meta",
               "paired_exchange_delivers_exactly_the_drawn_peers",
               "allreduce_is_the_task_order_float64_sum_and_equals_the_file_backend", "broadcast_from_each_root",
               "fetch_hands_out_a_streamed_buffer_again")
