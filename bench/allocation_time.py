"""Time of one `flops` allocation (and one λ learning step) at B = 4,096 and 65,536.

    python bench/allocation_time.py [--smoke]

Prints medians over repeats, and the growth from 4,096 to 65,536 divided by the growth of B
(1.0 is linear). One torch thread, as in the coordinator. --smoke: B = 512 and 8,192, 3 repeats.
"""
import argparse
import time

import numpy as np
import torch

from flops_dist.allocators import BatchFeatures, GaussianAllocator


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    small, large = (512, 8192) if args.smoke else (4096, 65536)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results = {}
    for batch in (small, large):
        features = BatchFeatures(rng.normal(size=batch), rng.normal(size=(batch, 32)))
        allocator = GaussianAllocator()
        c_hat = rng.gamma(1.0, size=batch)
        allocate = lambda: allocator.allocate(features, batch * 8, 2, rng)  # noqa: E731
        repeats = 3 if args.smoke else 21 if batch == small else 7
        results[batch] = (median_ms(allocate, repeats),
                          median_ms(lambda: allocator.learn(allocate()[1], c_hat), 5))
        print(f"B = {batch:>6}: allocate {results[batch][0]:8.2f} ms (median of {repeats}), "
              f"allocate + learn λ {results[batch][1]:8.2f} ms")
    growth, ratio = results[large][0] / results[small][0], large // small
    print(f"allocation time growth {small:,} -> {large:,}: x{growth:.1f} for x{ratio} examples "
          f"(growth / {ratio} = {growth / ratio:.2f}; 1.0 is linear)")


if __name__ == "__main__":
    main()
