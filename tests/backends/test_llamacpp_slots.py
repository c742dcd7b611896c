"""`SlotTable`: where requests to a llama.cpp server go, what pins hold, what gets saved.

Pure decisions (no server): the end-to-end behaviour on a real `llama-server` is in
tests/realengine.
"""

from __future__ import annotations

from treadle.backends.base import Message, ToolCall
from treadle.backends.openai_compat.llamacpp import (
    Saved,
    SlotTable,
    common_chars,
    message_chain,
)

SYSTEM = Message(role="system", content="You are an agent. " * 20)


def conversation(program: str, turns: int) -> list[Message]:
    messages = [SYSTEM, Message(role="user", content=f"task of {program} " * 10)]
    for i in range(turns):
        call = ToolCall(id=f"{program}-{i}", name="search", arguments='{"q": "x"}')
        messages.append(Message(role="assistant", content=None, tool_calls=[call]))
        messages.append(Message(role="tool", content=f"result {i} " * 20, tool_call_id=call.id))
    return messages


def run(table: SlotTable, program: str | None, messages: list[Message], now: float, **kw: object):
    """Place, start and finish one request that ends in a tool call (by default)."""
    chain = message_chain(messages)
    placement = table.place(program, chain, now, offload=bool(kw.pop("offload", False)))
    assert placement is not None
    table.started(placement, program, chain, now)
    turn = (len(messages) - 2) // 2  # the answer `conversation` has next
    answer = Message(
        role="assistant",
        tool_calls=[ToolCall(id=f"{program}-{turn}", name="search", arguments='{"q": "x"}')],
    )
    table.finished(
        placement.slot,
        program,
        message_chain([answer], chain),
        100,
        now,
        continues=bool(kw.pop("continues", True)),
        pin_ttl_s=kw.pop("pin_ttl_s", None),  # type: ignore[arg-type]
    )
    return placement


def test_chains_share_exactly_the_common_message_prefix() -> None:
    a = message_chain(conversation("a", 2))
    b = message_chain(conversation("b", 2))
    assert common_chars(a, a) == a[-1][1]
    assert common_chars(a, b) == len(SYSTEM.content or "")
    assert (
        common_chars(a, message_chain(conversation("a", 1)))
        == message_chain(conversation("a", 1))[-1][1]
    )
    assert common_chars((), a) == 0


def test_a_program_comes_back_to_its_own_slot() -> None:
    table = SlotTable(4)
    first = run(table, "a", conversation("a", 0), 0.0)
    run(table, "b", conversation("b", 0), 1.0)
    back = run(table, "a", conversation("a", 0) + conversation("a", 1)[2:], 2.0)
    assert back.slot is first.slot and back.reuse_chars > 0


def test_a_new_program_takes_an_empty_slot_not_a_waiting_programs_context() -> None:
    """Sharing the system prompt with `a`'s slot saves less than `a` would recompute when
    its tool returns: `b` takes the empty slot. Once `a` is done, its slot is fair game."""
    table = SlotTable(2)
    a = run(table, "a", conversation("a", 3), 0.0)
    b = run(table, "b", conversation("b", 0), 1.0)
    assert b.slot is not a.slot
    table = SlotTable(2)
    a = run(table, "a", conversation("a", 3), 0.0, continues=False)
    b = run(table, "b", conversation("b", 0), 1.0)
    assert b.slot is a.slot and b.reuse_chars == len(SYSTEM.content or "")


def test_a_pin_keeps_other_programs_out_until_its_deadline() -> None:
    table = SlotTable(2, max_pinned=2)
    a = run(table, "a", conversation("a", 0), 0.0, pin_ttl_s=5.0)
    run(table, "b", conversation("b", 0), 0.5, pin_ttl_s=5.0)
    assert table.stats.pins_set == 2
    # both slots pinned: a third program waits...
    assert table.place("c", message_chain(conversation("c", 0)), 1.0, offload=False) is None
    assert table.next_deadline(1.0) == 5.0
    # ...but the owner gets its slot back at once
    back = table.place("a", message_chain(conversation("a", 1)), 1.0, offload=False)
    assert back is not None and back.slot is a.slot
    # and after the deadline anyone may take it
    assert table.place("c", message_chain(conversation("c", 0)), 5.0, offload=False) is not None


def test_pins_over_the_cap_are_refused_and_release_ends_them() -> None:
    table = SlotTable(3)  # at most 2 pinned
    for i, p in enumerate("abc"):
        run(table, p, conversation(p, 0), float(i), pin_ttl_s=10.0)
    assert (table.stats.pins_set, table.stats.pins_refused) == (2, 1)
    assert table.in_use(3.0) == 2
    assert table.release("a") == 1
    assert table.in_use(3.0) == 1


def test_no_pin_after_the_last_step() -> None:
    table = SlotTable(2)
    run(table, "a", conversation("a", 0), 0.0, pin_ttl_s=5.0, continues=False)
    assert table.stats.pins_set == 0 and table.in_use(1.0) == 0


def test_offload_saves_a_waiting_program_on_eviction_and_restores_it() -> None:
    table = SlotTable(1)
    a = run(table, "a", conversation("a", 1), 0.0, offload=True)
    chain_a = a.slot.chain
    # `b` must take the only slot: `a` waits on its tool, so its sequence is saved first
    b = table.place("b", message_chain(conversation("b", 0)), 1.0, offload=True)
    assert b is not None and b.save_for == "a" and b.save_chain == chain_a
    table.started(b, "b", message_chain(conversation("b", 0)), 1.0)
    table.programs["a"].saved = Saved("a.bin", chain_a, 300)
    table.finished(b.slot, "b", b.slot.chain, 50, 2.0, continues=False, pin_ttl_s=None)
    # `a` comes back: its file holds more of its prompt than the slot does
    back = table.place("a", message_chain(conversation("a", 2)), 3.0, offload=True)
    assert back is not None and back.restore is not None and back.restore.filename == "a.bin"
    assert back.reuse_chars == chain_a[-1][1]


def test_without_offload_nothing_is_saved() -> None:
    table = SlotTable(1)
    run(table, "a", conversation("a", 1), 0.0)
    b = table.place("b", message_chain(conversation("b", 0)), 1.0, offload=False)
    assert b is not None and b.save_for is None


def test_a_finished_program_is_not_saved() -> None:
    table = SlotTable(1)
    run(table, "a", conversation("a", 1), 0.0, offload=True, continues=False)
    b = table.place("b", message_chain(conversation("b", 0)), 1.0, offload=True)
    assert b is not None and b.save_for is None


def test_a_failed_request_leaves_its_slot_unknown() -> None:
    table = SlotTable(1)
    chain = message_chain(conversation("a", 0))
    placement = table.place("a", chain, 0.0, offload=False)
    assert placement is not None
    table.started(placement, "a", chain, 0.0)
    assert table.place("b", chain, 0.0, offload=False) is None  # busy
    table.failed(placement.slot, 1.0)
    assert placement.slot.chain == () and not placement.slot.busy
