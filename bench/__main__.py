"""`python -m bench`: print every benchmark table (markdown)."""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as gunicorn.conf.py sets for the workers

from . import cache_bench, embed_bench, explain_bench, http_bench, pipeline_bench, request_path, threads_bench, whole_chunks_bench  # noqa: E402
from .common import machine  # noqa: E402

print(f"Machine: {machine()}")
pipeline_bench.main()
embed_bench.main()
whole_chunks_bench.main()
cache_bench.main()
threads_bench.main()
explain_bench.main()
http_bench.main()
request_path.main()
