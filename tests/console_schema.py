"""Checks the console API's answers against docs/console-api-v1.schema.json with jsonschema
(Draft 2020-12, formats checked).

Reads from stdin a JSON list of [definition, answer] pairs (definition: overview, farms, farm,
aggregation or error); prints every violation and exits 1 if there is any.
"""
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
failed = 0
for definition, answer in json.load(sys.stdin):
    sub = dict(schema)
    sub.pop("oneOf", None)
    sub["$ref"] = "#/$defs/" + definition
    validator = jsonschema.Draft202012Validator(sub, format_checker=jsonschema.FormatChecker())
    for error in validator.iter_errors(answer):
        failed += 1
        print(f"{definition}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
print(f"checked, {failed} violations")
sys.exit(1 if failed else 0)
