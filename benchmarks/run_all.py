"""Run the benchmarks and regenerate docs/performance.md.

    python -m benchmarks                       # decode, embed, build, search (10k, 100k), service
    python -m benchmarks --quick               # small sizes: a few minutes, for CI-style checks
    python -m benchmarks --full --with-1m      # also torch.compile and the 1M-vector search
    python -m benchmarks --only embed,search   # a subset (names: decode, embed, build, search, service)

Each benchmark writes benchmarks/results/<name>.json (service: service_clients.json); a benchmark that fails is
reported and the others still run. The page is then rebuilt from whatever results exist.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from benchmarks.common import load_average, say, write_result

ORDER = ("decode", "embed", "build", "search", "service")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    parser.add_argument("--full", action="store_true", help="also torch.compile in the embed benchmark")
    parser.add_argument("--with-1m", action="store_true", help="search also at 1,000,000 vectors (~30+ min)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate docs/performance.md")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.only.split(",")] if args.only else list(ORDER)
    unknown = set(wanted) - set(ORDER)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    failed = []
    for name in [n for n in ORDER if n in wanted]:
        started = time.perf_counter()
        say(f"=== {name} (1-min load average {load_average()[:1]})")
        try:
            if name == "decode":
                from benchmarks import bench_decode

                write_result("decode", bench_decode.run(args.quick))
            elif name == "embed":
                from benchmarks import bench_embed

                write_result("embed", bench_embed.run(args.quick, args.full))
            elif name == "build":
                from benchmarks import bench_build

                write_result("build", bench_build.run(args.quick))
            elif name == "search":
                from benchmarks import bench_search

                write_result("search", bench_search.run(args.quick))
                if args.with_1m:  # its own file, so that 10k/100k figures are not lost when the long run fails
                    write_result("search_1m", bench_search.run(sizes=[1_000_000]))
            elif name == "service":
                from benchmarks import bench_service

                write_result("service_clients", bench_service.run(args.quick))
        except Exception:  # noqa: BLE001 - one broken benchmark must not lose the others
            failed.append(name)
            traceback.print_exc()
        say(f"=== {name} done in {time.perf_counter() - started:.0f} s")
    if not args.no_report:
        from benchmarks import report

        report.main([])
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
