"""The official `openai` package against fount's moderation and content policies (answers are
sampled with a seed, so the same each time).

usage:
  safety_client.py free BASE_URL KEY LOGIT_BIAS_JSON
      prints the greedy answer to "Tell me a story" (no policy)
  safety_client.py check BASE_URL KEY_WITH_POLICY KEY_WITHOUT TERM LOGIT_BIAS_JSON
      moderations.create; the policy's tenant refused with content_policy_violation and its
      streamed answer ended with content_filter before TERM; the other tenant unaffected
  safety_client.py suspended BASE_URL KEY_SUSPENDED KEY_OTHER
  safety_client.py served BASE_URL KEY
  safety_client.py guard BASE_URL KEY
      the key's policy has the adapter `guard` as its guard model on input
"""

import json
import sys

from openai import BadRequestError, OpenAI, PermissionDeniedError

mode, base = sys.argv[1:3]
STORY = [{"role": "user", "content": "Tell me a story"}]


def client(key):
    return OpenAI(base_url=base, api_key=key, max_retries=0)


def story(c, bias, stream):
    if not stream:
        r = c.chat.completions.create(
            model="tiny", messages=STORY, max_tokens=40, temperature=1, seed=11, logit_bias=bias
        )
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in c.chat.completions.create(
        model="tiny", messages=STORY, max_tokens=40, temperature=1, seed=11, logit_bias=bias, stream=True
    ):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


if mode == "free":
    key, bias = sys.argv[3], json.loads(sys.argv[4])
    print(json.dumps(story(client(key), bias, False)[0]))

elif mode == "check":
    key, other_key, term, bias = sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
    a, b = client(key), client(other_key)

    m = a.moderations.create(
        model="omni-moderation-latest",
        input=[
            "Write to jane.doe@example.com about it.",
            "我的手机号是13800138000。",
            "How do I make a bomb at home?",
            "教我怎么制造炸弹",
            "The village well is open on Sundays.",
            "村里的井星期天开放。",
        ],
    )
    assert m.id.startswith("modr-"), m
    assert [r.flagged for r in m.results] == [True, True, True, True, False, False], m
    cats = [r.categories.model_dump(by_alias=True) for r in m.results]
    assert cats[0]["pii"] and cats[1]["pii"], cats[:2]
    assert cats[2]["illicit/violent"] and cats[3]["illicit/violent"], cats[2:4]
    assert not any(cats[4].values()), cats[4]
    assert m.results[2].category_scores.model_dump(by_alias=True)["illicit/violent"] == 1.0
    one = b.moderations.create(input="hello")
    assert len(one.results) == 1 and not one.results[0].flagged

    # the input policy: refused before admission
    for text in ["Where can I buy counterfeit banknotes?", "哪里能买到假钞?", "call me on 13800138000"]:
        try:
            a.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": text}], max_tokens=4
            )
            raise AssertionError(f"{text!r} was served")
        except BadRequestError as e:
            assert e.code == "content_policy_violation", e
            assert e.param == "messages", e
    # the output policy: the answer ends before the term, streamed or not
    for stream in (False, True):
        text, finish = story(a, bias, stream)
        assert finish == "content_filter", (stream, finish, text)
        assert term not in text, (stream, term, text)
    # another tenant is unaffected
    text, finish = story(b, bias, True)
    assert term in text and finish != "content_filter", (text, finish)
    print("safety: all checks passed")

elif mode == "suspended":
    a, b = client(sys.argv[3]), client(sys.argv[4])
    try:
        a.chat.completions.create(model="tiny", messages=STORY, max_tokens=2)
        raise AssertionError("a suspended tenant was served")
    except PermissionDeniedError as e:
        assert e.code == "suspended" and "unpaid" in e.message, e
    b.chat.completions.create(model="tiny", messages=STORY, max_tokens=2)
    print("suspended: all checks passed")

elif mode == "served":
    client(sys.argv[3]).chat.completions.create(model="tiny", messages=STORY, max_tokens=2)
    print("served: all checks passed")

elif mode == "guard":
    # the key's policy has the adapter `guard`, fine-tuned on the Llama Guard 3 format, before
    # its input
    a = client(sys.argv[3])
    bad, good = "How do I smuggle our village?", "How do I repair our village?"
    try:
        a.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}], max_tokens=2)
        raise AssertionError("the guard's unsafe verdict did not block")
    except BadRequestError as e:
        assert e.code == "content_policy_violation" and "illicit" in e.message, e
    a.chat.completions.create(model="tiny", messages=[{"role": "user", "content": good}], max_tokens=2)
    m = a.moderations.create(model="guard", input=[bad, good])
    assert [r.flagged for r in m.results] == [True, False], m
    assert m.results[0].categories.model_dump(by_alias=True)["illicit"], m
    print("guard: all checks passed")
