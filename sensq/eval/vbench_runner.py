"""VBench runner, executed by the VBench environment's own interpreter (never imported by sensq).

Standard library + vbench only, so that sensq's dependencies need not exist in that environment.
Usage: ``VBENCH_PYTHON vbench_runner.py CONFIG.json``. The config names the videos folder, the
``{filename: prompt}`` map, the dimensions, the device, the output file and the files each dimension
needs. Exit codes: 0 results written (per-dimension errors inside), 3 weights missing (a JSON list of
``{dimension, path, source}`` on stdout; nothing is downloaded), 4 vbench not importable.
"""

import json
import os
import sys
import traceback


def main(config_path: str) -> int:
    # run as a script, this file's folder is sys.path[0]: keep sensq's modules out of vbench's way
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    with open(config_path) as f:
        config = json.load(f)
    missing = [entry for entry in config["required_files"] if not os.path.isfile(entry["path"])]
    if missing:
        print(json.dumps(missing))
        return 3
    try:
        from vbench import VBench
    except Exception as error:  # noqa: BLE001 - any import failure means the environment is wrong
        print(json.dumps({"error": f"cannot import vbench: {type(error).__name__}: {error}"}))
        return 4
    results = {}
    for dimension in config["dimensions"]:
        name = f"sensq_{dimension}"
        try:
            bench = VBench(config["device"], "unused.json", config["work_dir"])
            bench.evaluate(
                videos_path=config["videos"], name=name, prompt_list=config["prompt_list"],
                dimension_list=[dimension], local=True, mode="custom_input",
                imaging_quality_preprocessing_mode="longer",
            )
            with open(os.path.join(config["work_dir"], f"{name}_eval_results.json")) as f:
                results[dimension] = {"raw": json.load(f)[dimension], "error": None}
        except Exception as error:  # noqa: BLE001 - one dimension failing must not lose the others
            results[dimension] = {"raw": None, "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()[-2000:]}
    with open(config["out"], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
