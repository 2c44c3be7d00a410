"""Example-forwards per second of flops_dist over EvoTorch's distributed PGPE, side by side on the
main job's task: the digits ViT, its classifier head `head` (330 numbers) learned, the body frozen.

    python bench/versus_peers.py [--steps 600] [--rounds 3] [--popsize 128] [--smoke]

An example-forward is one example's forward at one perturbation. flops_dist: one query (clean
forwards are not counted). EvoTorch: one solution evaluated on a 32-example batch counts 32.

Both sides share one local Ray with 2 CPUs, take 2 actors of one CPU and one torch thread each, and
spend the same number of example-forwards per round (steps × batch × queries per example: the
digits job's 600 × 32 × 256), so their held-out accuracies compare learning at an equal budget. Rounds alternate EvoTorch, flops_dist,
EvoTorch, …; round r is seed r on both sides; each side's rate is the median over rounds.

- EvoTorch: a `Problem` whose fitness is the whole ViT's mean cross-entropy on one 32-example batch
  per actor per generation (as SupervisedNE's common minibatch), one plain forward per solution;
  PGPE in distributed mode (each actor samples its share of the population and returns only a
  gradient). Timed over the generations after the first (actor start-up and first forwards).
  Popsize 128: a generation's fixed cost (Ray round trip, sampling, ranking) measured about 55 ms
  against about 800 ms of forwards, so a larger population would gain EvoTorch at most ~7% in rate
  but fewer generations fit the budget and it learns less (held-out accuracy 0.53-0.56 at 256,
  0.49 at 1024, 0.59-0.66 at 128). stdev 0.2 and centre lr 0.2 were the best of a small sweep at
  the job's former budget of 32 queries per example (0.01/0.01 does not move the accuracy from its
  start); EvoTorch's rate does not depend on the budget, only how far it learns does.
- flops_dist: `flops_dist.train` with the digits job's config. Rate = Σ queries / Σ seconds of the
  run log's steps after the first WARM_STEPS (worker start-up and the first vmap trace excluded).
"""
import argparse
import logging
import os
import statistics
import sys
import time

import numpy as np
import ray
import torch
import torch.nn.functional as F
from evotorch import Problem
from evotorch.algorithms import PGPE

import flops_dist
from common import digits_config, fresh_dir, wait_for_idle_cluster
from flops_dist.data import load_dataset
from flops_dist.loading import build_model, load_callable

BATCH = 32          # examples per EvoTorch fitness evaluation, and the digits job's batch size
WARM_STEPS = 10     # flops_dist steps left out of its rate
CPUS = 2


class HeadFitness(Problem):
    """f(w) = mean cross-entropy of the ViT with head weights w on a 32-example training batch.
    Each evaluation call (one actor's share of a generation) draws one batch that all its solutions
    share, as EvoTorch's SupervisedNE does with common_minibatch, and runs the whole ViT once per
    solution: EvoTorch sees a black box, so nothing of the frozen body is reused."""

    def __init__(self, model, train, num_actors):
        self.model = model.eval()
        self.head = list(model.head.parameters())
        self.x, self.y = torch.from_numpy(train.inputs), torch.from_numpy(train.labels)
        # initial_bounds only fills a SolutionBatch before PGPE overwrites it with its samples
        super().__init__("min", solution_length=sum(p.numel() for p in self.head), dtype=torch.float32,
                         initial_bounds=(-1.0, 1.0), num_actors=num_actors, actor_config={"num_cpus": 1})

    def _evaluate_batch(self, solutions):
        torch.set_num_threads(1)  # one thread per actor, as a flops_dist worker has
        # the global generator, which EvaluationActor seeds per actor (a Problem given its own seed
        # breaks EvoTorch 0.6.1's actors: they call a `Problem.seed` that does not exist)
        idx = torch.randint(len(self.y), (BATCH,))
        x, y = self.x[idx], self.y[idx]
        losses = torch.empty(len(solutions))
        with torch.no_grad():
            for i, w in enumerate(solutions.values):
                torch.nn.utils.vector_to_parameters(w, self.head)
                losses[i] = F.cross_entropy(self.model(x), y)
        solutions.set_evals(losses)


def accuracy(model, test) -> float:
    with torch.no_grad():
        scores = model(torch.from_numpy(test.inputs))
    return (scores.argmax(1).numpy() == test.labels).mean().item()


def evotorch_round(cfg, budget, popsize, stdev, lr):
    """EvoTorch's example-forwards/s and the held-out accuracy of PGPE's centre after `budget`
    example-forwards (the first generation, untimed, included)."""
    model = build_model(cfg)
    # the actors unpickle the model: ship its file-loaded module by value, as flops_dist does
    ray.cloudpickle.register_pickle_by_value(sys.modules[type(model).__module__])
    train = load_dataset(cfg.data.train, cfg.data.input_column, cfg.data.label_column)
    problem = HeadFitness(model, train, num_actors=CPUS)
    centre = torch.nn.utils.parameters_to_vector(problem.head).detach().clone()
    pgpe = PGPE(problem, popsize=popsize, center_init=centre, stdev_init=stdev, center_learning_rate=lr,
                stdev_learning_rate=0.1, distributed=True)
    generations = max(2, round(budget / (popsize * BATCH)))
    try:
        pgpe.step()  # starts the actors: EvoTorch's start-up, not timed
        began = time.perf_counter()
        for _ in range(generations - 1):
            pgpe.step()
        seconds = time.perf_counter() - began
    finally:
        problem.kill_actors()
    torch.nn.utils.vector_to_parameters(pgpe.status["center"], problem.head)
    test = load_dataset(cfg.data.test, cfg.data.input_column, cfg.data.label_column)
    return (generations - 1) * popsize * BATCH / seconds, accuracy(problem.model, test)


def flops_dist_round(cfg):
    """flops_dist's queries/s over its steps after the first WARM_STEPS, and its held-out accuracy."""
    model, loss_fn = build_model(cfg), load_callable(cfg.model.loss, "model.loss")
    result = flops_dist.train(model, loss_fn, cfg.data.train, cfg, test_data=cfg.data.test,
                              progress=lambda line: None)
    log = result.run_log.to_pydict()
    queries, seconds = np.array(log["queries"][WARM_STEPS:]), np.array(log["seconds"][WARM_STEPS:])
    return queries.sum() / seconds.sum(), result.metric_after


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600,
                        help="flops_dist steps; EvoTorch gets the same example-forwards")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--popsize", type=int, default=128)
    parser.add_argument("--stdev", type=float, default=0.2, help="PGPE's initial search stdev")
    parser.add_argument("--lr", type=float, default=0.2, help="PGPE's centre learning rate (ClipUp)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = WARM_STEPS + 5, 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its INFO lines would mix with the table
    out = fresh_dir("versus_peers")
    # one Ray for both sides; address="local": our own, never a cluster `ray start` left running.
    # flops_dist.train and EvoTorch both use a Ray that is already initialised.
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, logging_level="WARNING")
    rows = []
    for r in range(args.rounds):  # interleaved, so drifts in machine load hit both sides alike
        # round r is seed r on both sides, so the accuracies show seed spread, not one draw
        cfg = digits_config(train__steps=args.steps, train__seed=r, output__run_dir=str(out / f"round-{r}"),
                            metrics__port=-1)
        torch.manual_seed(r)
        wait_for_idle_cluster(CPUS)
        evo = evotorch_round(cfg, args.steps * cfg.train.batch_size * cfg.train.queries_per_example,
                             args.popsize, args.stdev, args.lr)
        wait_for_idle_cluster(CPUS)
        rows.append((r, *evo, *flops_dist_round(cfg)))
    ray.shutdown()
    report(rows, args)


def report(rows, args):
    print(f"EvoTorch PGPE: distributed, 2 actors, popsize {args.popsize}, stdev {args.stdev}, "
          f"centre lr {args.lr}; flops_dist: digits job, 2 workers, {args.steps} steps")
    print("round  EvoTorch ex-fwd/s  test acc   flops_dist ex-fwd/s  test acc")
    for r, evo_rate, evo_acc, fd_rate, fd_acc in rows:
        print(f"{r:>5}  {evo_rate:17.0f}  {evo_acc:8.4f}   {fd_rate:19.0f}  {fd_acc:8.4f}")
    evo, fd = statistics.median(row[1] for row in rows), statistics.median(row[3] for row in rows)
    print(f"median over {len(rows)} rounds: EvoTorch {evo:.0f}, flops_dist {fd:.0f} example-forwards/s")
    print(f"flops_dist / EvoTorch example-forwards per second: {fd / evo:.2f}")


if __name__ == "__main__":
    main()
