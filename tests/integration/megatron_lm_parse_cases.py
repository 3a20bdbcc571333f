"""Run in a subprocess with a Megatron-LM checkout first on PYTHONPATH: Megatron-LM's real
parse_args with the launcher's hook, for each case ({"argv": [...], "env": {...}}) read as
JSON from stdin. Prints one JSON
list: per argv the exit code and stderr of the parser (on an error), or the parsed --spec and
the EPS settings the run would use."""

import contextlib
import io
import json
import os
import sys


def main():
    from megatron.training import arguments

    from megatron_eps.launch import add_eps_group_to_megatron_parser
    from megatron_eps.megatron_lm import CONFIG_ENV, eps_config_for

    add_eps_group_to_megatron_parser(arguments)
    results = []
    for case in json.load(sys.stdin):
        os.environ.pop(CONFIG_ENV, None)
        os.environ.update(case.get("env", {}))
        sys.argv = ["script.py"] + case["argv"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = arguments.parse_args()
        except SystemExit as exc:
            results.append({"exit": exc.code, "stderr": err.getvalue()})
            continue
        results.append({"exit": None, "spec": args.spec,
                        "eps": eps_config_for(args).to_dict() if args.spec else None})
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
