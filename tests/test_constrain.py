"""Grammar-constrained decoding (runtime/constrain.py) on the real SmolLM2 tokenizer and model (numpy engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vkpack.runtime.constrain import ConstraintCompiler, ConstraintError, gbnf_grammar, grammar_from_request

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(smollm2_archive):
    from vkpack.runtime.engine import Engine

    with Engine(smollm2_archive, device="numpy") as eng:
        yield eng


@pytest.fixture(scope="module")
def compiler(engine):
    return ConstraintCompiler.for_engine(engine)


def constrained_greedy(engine, prompt_ids, constraint, max_tokens):
    """The scheduler's per-sequence hook in miniature: mask, pick, tell the constraint, stop when it is finished."""
    out = []
    with engine.kv_session(len(prompt_ids) + max_tokens) as kv:
        logits = engine.prefill(prompt_ids, kv, len(prompt_ids))[-1].copy()
        for _ in range(max_tokens):
            logits = constraint.apply(logits)
            tok = int(np.argmax(logits))
            if tok in engine.eos_ids:
                assert constraint.complete  # EOS passes the mask only where the grammar may end
                break
            constraint.accept(tok)
            out.append(tok)
            if constraint.finished:
                break
            logits = engine.executor.forward(np.asarray([tok]), len(prompt_ids) + len(out) - 1, kv)[-1].copy()
    return out


def chat_ids(engine, text):
    return engine.encode(engine.apply_chat_template([{"role": "user", "content": text}]))


def check_person(obj):
    assert set(obj) == {"name", "age", "hobbies"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 24
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert isinstance(obj["hobbies"], list) and len(obj["hobbies"]) <= 3
    assert all(isinstance(h, str) and len(h) <= 16 for h in obj["hobbies"])


def test_json_schema_greedy_decode_is_valid(engine, compiler):
    body = {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}
    c = compiler.compile(grammar_from_request(body))
    out = constrained_greedy(engine, chat_ids(engine, "Describe a person as JSON."), c, 80)
    assert c.finished and c.complete
    check_person(json.loads(engine.decode(out)))


def test_unconstrained_output_is_not_the_schema(engine):
    """The constraint is what makes the JSON above: the same prompt without it is not a PERSON object."""
    text = engine.generate(chat_ids(engine, "Describe a person as JSON."), max_tokens=24, temperature=0)
    try:
        check_person(json.loads(text))
    except (ValueError, AssertionError, TypeError):
        return
    pytest.fail(f"the unconstrained model wrote a valid PERSON by itself: {text!r}")


def test_gbnf_grammar_decode(engine, compiler):
    c = compiler.compile(grammar_from_request({"grammar": 'root ::= ("yes" | "no") "."'}))
    out = constrained_greedy(engine, chat_ids(engine, "Is Paris in France?"), c, 8)
    assert engine.decode(out) in ("yes.", "no.") and c.finished
    assert np.flatnonzero(c.allowed()).tolist() == sorted(engine.eos_ids)  # finished: only EOS
    c.accept(min(engine.eos_ids))  # the scheduler's hook reports the EOS it samples too
    assert c.complete


def test_mask_never_allows_a_token_that_breaks_a_finite_grammar(engine, compiler):
    """Every one of the 49152 tokens, at every step: allowed only if the text stays a prefix of the language
    (not all such tokens are allowed: llguidance writes text the grammar forces in its canonical tokens)."""
    words = ["yes.", "no.", "maybe later."]
    c = compiler.compile(gbnf_grammar('root ::= "yes." | "no." | "maybe later."'))
    pieces = [engine.tokenizer.decode([i]) for i in range(engine.n_token_ids)]
    specials = {i for i in range(engine.n_token_ids) if engine.tokenizer.id_to_token(i).startswith("<")
                and engine.tokenizer.decode([i], skip_special_tokens=True) == ""}
    text, ids = "", []
    rng = np.random.default_rng(0)
    for _ in range(12):
        allowed = c.allowed()
        expect = np.array([i not in specials and p != "" and any(w.startswith(text + p) for w in words)
                           for i, p in enumerate(pieces)])
        eos = min(engine.eos_ids)
        expect[eos] = text in words
        assert allowed.any() and not (allowed & ~expect).any(), np.flatnonzero(allowed & ~expect)[:10]
        if c.finished:
            break
        logits = rng.standard_normal(engine.n_token_ids).astype(np.float32)
        logits = c.apply(logits)
        tok = int(np.argmax(logits))
        c.accept(tok)
        ids.append(tok)
        text += pieces[tok]
    assert text in words and c.finished


def test_random_logits_never_leave_the_schema(engine, compiler):
    """Property: whatever the logits, masked sampling ends in a document valid against the schema."""
    spec = grammar_from_request({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    rng = np.random.default_rng(1)
    eos = sorted(engine.eos_ids)
    done = 0
    for trial in range(6):
        c = compiler.compile(spec)
        out = []
        for _ in range(300):
            logits = rng.standard_normal(engine.n_token_ids).astype(np.float32) * 4
            logits[eos] += 6.0  # end as soon as the grammar lets it, so documents stay short
            before = logits.copy()
            masked = c.apply(logits)
            allowed = c.allowed()
            assert np.array_equal(logits, before)                          # the argument is left alone
            assert np.array_equal(np.isneginf(masked), ~allowed)           # -inf exactly where disallowed
            assert np.array_equal(masked[allowed], before[allowed])        # the rest untouched
            c.mask_inplace(logits)
            assert np.array_equal(logits, masked)
            logits = masked
            tok = int(rng.choice(np.flatnonzero(logits == logits.max())))
            if tok in eos:
                break
            c.accept(tok)
            out.append(tok)
            if c.finished:
                break
        if c.complete:
            check_person(json.loads(engine.decode(out)))
            done += 1
    assert done >= 4, f"only {done} of 6 random walks completed a document"


def test_a_token_outside_the_mask_is_refused(engine, compiler):
    c = compiler.compile(gbnf_grammar('root ::= "yes"'))
    bad = engine.encode("no")[0]
    assert not c.allowed()[bad]
    with pytest.raises(ConstraintError, match="not allowed"):
        c.accept(bad)


def test_special_tokens_are_named_by_id(compiler):
    assert compiler.literal("<|im_start|>") == "<[1]>"
    assert compiler.literal("<tool_call>") == '"<tool_call>"'


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}},
     "response_format.json_schema.schema", "regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format.json_schema.schema", "nowhere"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "missing"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'json_object' or 'json_schema'"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"grammar": "root ::= foo"}, "grammar", "not a valid GBNF"),
    ({"grammar": "root ::= [a-"}, "grammar", "not a valid GBNF"),
    ({"grammar": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000}, "grammar", "nested too deeply"),
    ({"grammar": 42}, "grammar", "non-empty string"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "set only one"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "json_schema", "Unsatisfiable"),
])
def test_bad_schemas_and_grammars_are_clear_errors(compiler, body, param, message):
    with pytest.raises(ConstraintError, match=message) as e:
        compiler.compile(grammar_from_request(body))  # some fail when parsed, the rest when compiled
    assert e.value.param == param
    assert "\n" not in str(e.value) and str(e.value).startswith(f"'{param}")


def test_text_format_means_no_constraint():
    assert grammar_from_request({"response_format": {"type": "text"}}) is None
    assert grammar_from_request({}) is None


def test_json_object_allows_only_objects(engine, compiler):
    c = compiler.compile(grammar_from_request({"response_format": {"type": "json_object"}}))
    allowed = c.allowed()
    assert allowed[engine.encode("{")[0]] and not allowed[engine.encode("[")[0]] and not allowed[engine.encode("Hi")[0]]
