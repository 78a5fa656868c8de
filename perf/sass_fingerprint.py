"""A fingerprint of every shipped kernel's machine code (no GPU needed): one line per
configuration with its SASS instruction count and a hash of the instructions (addresses
dropped). Run it at two commits and diff the outputs: identical lines mean a refactor left the
machine code of that kernel unchanged, so its GPU results still hold.

    CUTE_DSL_ARCH=sm_90a CUTE_DSL_KEEP=cubin python perf/sass_fingerprint.py > before.txt
"""

import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgattn_cute.host.compile import (  # noqa: E402
    all_calibrate_configs,
    all_configs,
    all_key_lists_configs,
    all_pooled_scores_configs,
    all_tile_means_configs,
    all_top_p_configs,
    sass_of,
)

ADDRESS = re.compile(r"/\*[0-9a-f]{4,}\*/")


def main():
    for config in (all_configs() + all_calibrate_configs() + all_top_p_configs()
                   + all_tile_means_configs() + all_pooled_scores_configs()
                   + all_key_lists_configs()):
        code = [ADDRESS.sub("", line).strip() for line in sass_of(config).splitlines()
                if ADDRESS.search(line)]
        digest = hashlib.sha1("\n".join(code).encode()).hexdigest()[:16]
        print(f"{config} {len(code)} {digest}", flush=True)


if __name__ == "__main__":
    main()
