"""Beam runner selection: the pipeline code never knows which runner executes it.

- local: Beam's FnApiRunner (DirectRunner) with one worker per core, fully offline (the default
  runner would first try to download a Prism binary). On up to THREADS_UP_TO_CORES cores the
  workers are threads: no per-worker interpreter, torch and model start-up, and torch, Pillow,
  hashlib and the compiled srm counting release the GIL. On 2 cores, 600 images took 12.8-13.7 s
  instead of 15.2 s. At 20,000 JPEGs (srm, session 8) threads scanned 106 img/s in 1.15 GiB,
  processes 117 img/s in 2.54 GiB: a tenth slower for less than half the memory, which a small
  machine needs more. Until session 8 scans of 5,000 files and more used processes, because the
  local runner's group-by grew without bound in threads mode (24 GB at 20,000 files); it now
  holds only chunk counts (docs/performance.md). Larger machines use processes.
  `mode=` overrides.
- dask: Beam's DaskRunner; `--runner-option dask_address=HOST:PORT`, or a local cluster when
  no address is given.
- flink, spark, dataflow: the runner-options are passed through as pipeline options
  (`--runner-option flink_master=...`, `project=...`, `temp_location=...`); the DoFns are
  picklable and read and write only through fsspec, which is what those runners need.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from lida_core.errors import RunnerError

if TYPE_CHECKING:  # Beam is imported when options are made, so the command can read RUNNERS without it
    from apache_beam.options.pipeline_options import PipelineOptions

THREADS_UP_TO_CORES = 4

RUNNERS = {"local": "DirectRunner", "dask": "apache_beam.runners.dask.dask_runner.DaskRunner", "flink": "FlinkRunner", "spark": "SparkRunner", "dataflow": "DataflowRunner"}


LOCAL_MODES = ("in_memory", "multi_threading", "multi_processing")  # Beam's DirectRunner running modes



def parse_runner_options(items: Sequence[str]) -> dict[str, str]:
    options = {}
    for item in items:
        if "=" not in item:
            raise RunnerError(f"--runner-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = value
    if "workers" in options and not (options["workers"].isdigit() and 1 <= int(options["workers"]) <= 1024):
        raise RunnerError(f"--runner-option workers= takes a whole number from 1 to 1024, got {options['workers']!r}")
    if "mode" in options and options["mode"] not in LOCAL_MODES:
        raise RunnerError(f"--runner-option mode= takes one of {', '.join(LOCAL_MODES)}, got {options['mode']!r}")
    return options


@contextlib.contextmanager
def pipeline_options(runner: str = "local", runner_options: Sequence[str] = (), workers: int | None = None,
                     beam_args: Sequence[str] | None = None, partitions: int | None = None) -> Iterator[PipelineOptions]:
    """PipelineOptions for `runner`; a local Dask cluster lives as long as the context.

    The local mode: threads on a few cores, processes on more (the module's docstring says why).
    `beam_args` (Beam's own flags, from a job's `run(argv)`) replace all of that when they name a
    runner; without one they are added after lida's local choice, so every flag reaches Beam.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    if beam_args is not None and any(a.startswith("--runner") for a in beam_args):
        yield PipelineOptions(list(beam_args))
        return
    extra_flags = list(beam_args or [])  # Beam flags without a runner: lida's local choice, then these (they win)
    if runner not in RUNNERS:
        raise RunnerError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    extra = parse_runner_options(runner_options)
    flags = [f"--runner={RUNNERS[runner]}", "--default_sdk_harness_log_level=WARNING"]
    cluster = client = None
    if runner == "local":
        n = int(extra.pop("workers", workers or os.cpu_count() or 1))
        few_cores = (os.cpu_count() or 1) <= THREADS_UP_TO_CORES
        mode = "in_memory" if n == 1 else ("multi_threading" if few_cores else "multi_processing")
        flags += [f"--direct_num_workers={n}", "--direct_running_mode=" + extra.pop("mode", mode)]
    elif runner == "dask":
        address = extra.pop("dask_address", None)
        n_workers = int(extra.pop("workers", workers or os.cpu_count() or 1))
        if address is None:
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.WARNING)
            client = Client(cluster)
            address = cluster.scheduler_address
        flags.append(f"--dask_client_address={address}")
        if "dask_npartitions" not in extra and "dask_partition_size" not in extra:
            # Beam's Dask Reshuffle does not spread a small collection: without partitions one worker
            # took every shard. One partition per unit of work (the scan's shards), at least 2 per worker.
            flags.append(f"--dask_npartitions={max(2 * n_workers, partitions or 0)}")
    flags += [f"--{key}={value}" for key, value in extra.items()]
    try:
        yield PipelineOptions(flags + extra_flags)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
