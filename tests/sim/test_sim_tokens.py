"""The stand-in tokenizer and chained block hashes."""

from __future__ import annotations

import pytest

from treadle.backends.base import Message, ToolCall
from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.tokenizer import (
    ORDINARY_VOCAB,
    VOCAB_SIZE,
    encode_chat,
    encode_completion,
    tokenize,
    tokenize_with_offsets,
)

PROSE = (
    "The committee met on Tuesday to discuss the proposal for a new library in the north "
    "of the city. Several members argued that the budget should first cover repairs to the "
    "existing buildings, while others pointed out that the population had grown quickly "
    "and that the old branch could no longer serve everyone who needed it. "
) * 20


def test_tokenize_is_deterministic_and_in_vocab() -> None:
    ids = tokenize(PROSE)
    assert ids == tokenize(PROSE)
    assert all(0 <= i < ORDINARY_VOCAB for i in ids)
    assert len(PROSE) / len(ids) == pytest.approx(4.0, abs=0.8)


def test_offsets_cover_the_text() -> None:
    text = "Hello, world!  Numbers 123456 and unbelievably-long-words."
    ids, ends = tokenize_with_offsets(text)
    assert len(ids) == len(ends)
    assert ends == sorted(ends)
    assert ends[-1] == len(text)


def test_texts_agree_up_to_a_piece_boundary() -> None:
    a = "Plan the trip to Lisbon."
    assert tokenize(a + " Then book hotels.")[: len(tokenize(a))] == tokenize(a)


def test_chat_prefixes_give_token_prefixes() -> None:
    system = Message(role="system", content="You are a careful assistant.")
    turn1 = [system, Message(role="user", content="What is 2+2?")]
    answer = Message(
        role="assistant",
        content=None,
        tool_calls=[ToolCall(id="c1", name="calc", arguments='{"expr": "2+2"}')],
    )
    turn2 = [*turn1, answer, Message(role="tool", content="4", tool_call_id="c1")]
    first = encode_chat(turn1)
    generated = encode_completion(answer.content, answer.tool_calls)
    second = encode_chat(turn2)
    # The next turn's prompt starts with this turn's prompt *and* what it generated.
    assert second[: len(first) + len(generated)] == first + generated
    assert all(0 <= t < VOCAB_SIZE for t in second)


def test_prompt_from_tokens_chains_blocks() -> None:
    a = list(range(100))
    b = [*range(64), *range(1000, 1036)]
    pa, pb = Prompt.from_tokens(a), Prompt.from_tokens(b)
    assert pa.ends == (1, 2, 3, 4, 5, 6)  # 6 full blocks, 4 tokens left over
    assert pa.keys[:4] == pb.keys[:4]  # the first 64 tokens agree
    assert pa.keys[4] != pb.keys[4]
    # Appending gives the same hashes as hashing the whole sequence.
    assert Prompt.from_tokens(a).extend_tokens(b).keys == Prompt.from_tokens(a + b).keys
    assert pa.cacheable_tokens == 96


def test_prompt_from_block_keys_expands_to_sub_blocks() -> None:
    p = Prompt.from_block_keys([7, 8, 9], 1200)
    assert p.num_tokens == 1200
    assert [n for _, n in p.extents()] == [32, 32, 11]  # 512 + 512 + 176 tokens
    assert len(p.block_hashes()) == 75
    q = Prompt.from_block_keys([7, 8, 10], 1100)
    assert p.keys[:2] == q.keys[:2] and p.keys[2] != q.keys[2]
    # The same key after a different prefix is different content.
    assert Prompt.from_block_keys([1, 8], 600).keys[1] != p.keys[1]
    with pytest.raises(ValueError):
        Prompt.from_block_keys([1, 2], 2000)


def test_segments_extend_consistently() -> None:
    base = Prompt.from_segments([("sys", 300), ("q1", 50)])
    longer = Prompt.from_segments([("sys", 300), ("q1", 50), ("a1", 40)])
    assert base.extend_segments([("a1", 40)]).keys == longer.keys
    assert longer.keys[: len(base.keys)] == base.keys
    with pytest.raises(TypeError):
        base.extend_tokens([1, 2, 3])
