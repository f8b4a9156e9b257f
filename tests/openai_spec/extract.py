"""Cut the schemas hguard's tests validate against out of the official OpenAI OpenAPI document.

    python tests/openai_spec/extract.py openapi.json <commit>

`openapi.json` is the file of that name in https://github.com/openai/openai-openapi (MIT, see LICENSE
here). The roots below and every schema they reference are copied verbatim into schemas.json, with
the source commit and the spec's version; nothing is edited (the tests read OpenAPI's `nullable`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse"]


def references(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value.rsplit("/", 1)[-1]
            else:
                yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


def extract(spec: dict) -> dict[str, dict]:
    schemas, kept, todo = spec["components"]["schemas"], {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = schemas[name]
            todo.extend(references(schemas[name]))
    return dict(sorted(kept.items()))


if __name__ == "__main__":
    source, commit = Path(sys.argv[1]), sys.argv[2]
    spec = json.loads(source.read_text())
    out = {"source": "https://github.com/openai/openai-openapi/blob/" + commit + "/openapi.json",
           "openapi": spec["openapi"], "version": spec["info"]["version"], "roots": ROOTS,
           "components": {"schemas": extract(spec)}}
    (Path(__file__).parent / "schemas.json").write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
