"""``mlx-diffgemma generate --json-schema/--regex``: constrained replies and one-line refusals."""

import json
import re

import jsonschema
import pytest

from test_cli import invoke, one_error_line

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
          "required": ["city", "days"]}


def test_generate_with_a_json_schema_prints_json_that_validates(hf_checkpoint, tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    result = invoke("generate", "Plan a trip", "--model", str(hf_checkpoint), "--json-schema", str(path),
                    "--max-tokens", "64", "--steps", "3", "--seed", "0")
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_generate_with_a_regex_prints_a_match(hf_checkpoint):
    result = invoke("generate", "A code", "--model", str(hf_checkpoint), "--regex", "[A-Z]{2}-[0-9]{3}",
                    "--max-tokens", "32", "--steps", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", result.stdout.removesuffix("\n")), result.stdout


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "{schema}", "--regex", "a+"], "give --json-schema or --regex, not both"),
    (["--regex", "a+", "--think"], "--regex cannot be combined with --think"),
    (["--json-schema", "{bad_json}"], "bad.json: Expecting property name"),
    (["--json-schema", "{unsupported}"], "Format hostname is not supported"),
    (["--json-schema", "{missing}"], "No such file or directory"),
    (["--regex", "(a"], "cannot compile the regex"),
    (["--regex", "[0-9]{40}", "--max-tokens", "8"], "more than max_tokens (8)"),
])
def test_bad_constraints_are_one_error_line(hf_checkpoint, tmp_path, args, message):
    files = {"schema": tmp_path / "schema.json", "bad_json": tmp_path / "bad.json",
             "unsupported": tmp_path / "host.json", "missing": tmp_path / "none.json"}
    files["schema"].write_text(json.dumps(SCHEMA))
    files["bad_json"].write_text("{oops")
    files["unsupported"].write_text(json.dumps({"type": "string", "format": "hostname"}))
    args = [str(files[a[1:-1]]) if a[1:-1] in files else a for a in args]
    line = one_error_line(invoke("generate", "hi", "--model", str(hf_checkpoint), "--steps", "2", *args))
    assert message in line
