"""A scripted chat on a sharded model, for test_distributed: one process, or rank 0 of
several under ``mlx.launch`` with the other ranks following (``Lockstep``).

Prints one JSON line: the token ids of every reply. The script covers what can desync
the ranks: a reply stopped early, a turn reusing the prompt cache after it, a
conversation reset on rank 0 only, a refused request, and a stop string.
"""

import json
import sys

import mlx.core as mx

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.generate import resolve_settings
from mlx_diffgemma.lockstep import Lockstep

group = mx.distributed.init()
model, tokenizer = load(sys.argv[1], dtype=mx.float64, group=group)  # float64: tokens comparable across ranks
lockstep = Lockstep(group) if group.size() > 1 else None
if lockstep and not lockstep.leader:
    lockstep.follow(model, tokenizer)
    sys.exit(0)

session = ChatSession(model, tokenizer, generator=lockstep.stream if lockstep else stream_generate,
                      max_tokens=20, settings=resolve_settings(model, steps=6), seed=3)
replies = []


def reply(text: str, **options) -> None:
    replies.append([t for r in session.send(text, **options) for t in r.tokens])


reply("hello there")
stream = session.send("and again", draft=True)
next(stream)  # the first draft, then the user stops the reply
stream.close()
reply("a third turn")  # continues the cache the stopped reply left
session.reset()  # rank 0 only
reply("hello there")
try:
    list(session.send("refused", steps=0))
except ValueError as e:
    replies.append(str(e))
session.reset()
reply("hello there", stop=[tokenizer.decode(replies[0][6:9])])  # ends at the first canvas
if lockstep:
    lockstep.close()
print(json.dumps({"ranks": group.size(), "replies": replies}))
