"""The scheduler alone, with a fake 'model' that samples token 7: budgets, chunking, preemption."""
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence, SequenceStatus
from pagedserve.sampling_params import SamplingParams

BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=256, prefix=True):
    manager = BlockManager(num_blocks, BLOCK, prefix)
    return Scheduler(manager, max_num_seqs, budget, max_model_len), manager


def make_seq(prompt_len: int, max_tokens: int = 4, start: int = 0, **params) -> Sequence:
    tokens = list(range(start, start + prompt_len))
    return Sequence("r", tokens, SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens,
                    eos_token_ids=frozenset({2}))


def run_step(scheduler: Scheduler, token: int = 7):
    output = scheduler.schedule()
    sampled = {item.seq.seq_id: token for item in output.scheduled if item.is_sampling}
    scheduler.update(output, sampled)
    return output


def test_long_prompt_is_chunked_and_decodes_share_the_step():
    scheduler, _ = make_scheduler(budget=16)
    short = make_seq(3, max_tokens=10)
    scheduler.add(short)
    run_step(scheduler)                                    # short: prefill done, one token sampled
    long = make_seq(40, start=1000)
    scheduler.add(long)
    output = run_step(scheduler)
    sizes = {item.seq.seq_id: item.num_new_tokens for item in output.scheduled}
    assert sizes == {short.seq_id: 1, long.seq_id: 15}     # decode first, then a chunk within budget
    assert output.num_batched_tokens == 16
    assert not [i for i in output.scheduled if i.seq is long][0].is_sampling
    output = run_step(scheduler)
    assert {i.seq.seq_id: i.num_new_tokens for i in output.scheduled}[long.seq_id] == 15
    output = run_step(scheduler)
    assert {i.seq.seq_id: i.num_new_tokens for i in output.scheduled}[long.seq_id] == 10
    assert long.num_output_tokens == 1


def test_max_num_seqs_limits_the_running_set():
    scheduler, _ = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(2, start=100 * i) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    output = run_step(scheduler)
    assert len(output.scheduled) == 2 and len(scheduler.waiting) == 1


def test_sequences_finish_on_max_tokens_eos_and_stop_ids_and_free_blocks():
    scheduler, manager = make_scheduler()
    by_length = make_seq(3, max_tokens=2)
    by_eos = make_seq(3, max_tokens=5, start=10, ignore_eos=False)
    by_stop_id = make_seq(3, max_tokens=5, start=20, stop_token_ids=[9])
    for seq in (by_length, by_eos, by_stop_id):
        scheduler.add(seq)
    run_step(scheduler, token=5)
    output = scheduler.schedule()
    tokens = {by_length.seq_id: 5, by_eos.seq_id: 2, by_stop_id.seq_id: 9}
    scheduler.update(output, tokens)
    assert by_length.status is SequenceStatus.FINISHED_LENGTH
    assert by_eos.status is SequenceStatus.FINISHED_STOPPED and by_eos.stop_reason is None
    assert by_stop_id.status is SequenceStatus.FINISHED_STOPPED and by_stop_id.stop_reason == 9
    assert manager.num_free_blocks == manager.num_blocks
    assert scheduler.num_unfinished == 0


def test_min_tokens_suppresses_early_stop():
    scheduler, _ = make_scheduler()
    seq = make_seq(3, max_tokens=5, stop_token_ids=[9], min_tokens=2)
    scheduler.add(seq)
    run_step(scheduler, token=9)
    assert not seq.is_finished
    run_step(scheduler, token=9)
    assert seq.status is SequenceStatus.FINISHED_STOPPED


def test_preemption_recomputes_the_newest_sequence_and_loses_nothing():
    # 6 blocks of 4 tokens; two sequences of 8-token prompts growing to 14 tokens cannot both fit.
    scheduler, manager = make_scheduler(num_blocks=6, budget=64, prefix=False)
    first, second = make_seq(8, max_tokens=6), make_seq(8, max_tokens=6, start=500)
    scheduler.add(first)
    scheduler.add(second)
    steps = 0
    preempted_seen = False
    while scheduler.num_unfinished:
        output = run_step(scheduler)
        steps += 1
        preempted_seen |= second.num_preemptions > 0
        assert output.num_batched_tokens <= 64
        assert steps < 100
    assert preempted_seen and first.num_preemptions == 0
    for seq in (first, second):
        assert seq.num_output_tokens == 6 and seq.status is SequenceStatus.FINISHED_LENGTH
    assert manager.num_free_blocks == 6


def test_admission_uses_prefix_cache_and_reports_cached_tokens():
    scheduler, _ = make_scheduler()
    first = make_seq(10, max_tokens=1)
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(10, max_tokens=1)
    scheduler.add(second)
    output = run_step(scheduler)
    assert second.num_cached_tokens == 8
    assert output.scheduled[0].num_new_tokens == 2


def test_forked_siblings_start_from_the_parent_prompt():
    scheduler, manager = make_scheduler(prefix=False)
    parent = make_seq(10, max_tokens=2)
    children = [make_seq(10, max_tokens=2) for _ in range(2)]
    parent.pending_forks = children
    scheduler.add(parent)
    run_step(scheduler)
    assert all(child.num_computed_tokens == 8 for child in children)
    assert manager.blocks[parent.block_ids[0]].ref_count == 3
    output = scheduler.schedule()
    child_sizes = [i.num_new_tokens for i in output.scheduled if i.seq in children]
    assert child_sizes == [2, 2]
    scheduler.update(output, {i.seq.seq_id: 7 for i in output.scheduled if i.is_sampling})
    while scheduler.num_unfinished:
        run_step(scheduler)
    assert manager.num_free_blocks == manager.num_blocks


def test_abort_frees_blocks_immediately_and_cancels_pending_forks():
    scheduler, manager = make_scheduler()
    parent = make_seq(30, max_tokens=4)
    child = make_seq(30, max_tokens=4)
    parent.pending_forks = [child]
    scheduler.add(parent)
    scheduler.schedule()                       # chunk in flight, blocks allocated
    assert manager.num_free_blocks < manager.num_blocks
    scheduler.finish(parent, SequenceStatus.FINISHED_ABORTED)
    assert manager.num_free_blocks == manager.num_blocks
    assert child.status is SequenceStatus.FINISHED_ABORTED
    assert scheduler.num_unfinished == 0


def test_finished_ids_are_reported_once():
    scheduler, _ = make_scheduler()
    seq = make_seq(3, max_tokens=1)
    scheduler.add(seq)
    run_step(scheduler)
    assert seq.is_finished
    assert scheduler.schedule().finished_seq_ids == (seq.seq_id,)
    assert scheduler.schedule().finished_seq_ids == ()


def test_sequences_in_flight_are_neither_scheduled_nor_preempted():
    """Pipeline parallel: a batch still in flight keeps its sequences; the next batch takes the others, and
    when the cache is full it preempts among those, never one whose step has not come back."""
    scheduler, manager = make_scheduler(num_blocks=4, budget=64, prefix=False)
    first, second = make_seq(8, max_tokens=8), make_seq(8, max_tokens=8, start=500)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)                       # both prompts: 2 blocks each, the cache is full; 9 tokens each now
    # first's next step is in flight; second needs a third block: the only victim allowed is second itself
    output = scheduler.schedule(frozenset({first.seq_id}))
    assert output.is_empty
    assert second.num_preemptions == 1 and second.status is SequenceStatus.WAITING
    assert first.status is SequenceStatus.RUNNING and first.num_preemptions == 0 and len(first.block_ids) == 2
    # once first's step is back it runs again, on the blocks second gave up
    assert [item.seq for item in scheduler.schedule().scheduled] == [first]
    assert manager.num_free_blocks == 1
