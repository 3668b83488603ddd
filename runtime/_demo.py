"""``python -m shoal demo``: tasks, an actor and a remote error on a local cluster."""

from __future__ import annotations

import time


def run() -> None:
    import shoal

    t0 = time.perf_counter()
    shoal.init(num_cpus=2)
    print(
        f"Started a local cluster in {time.perf_counter() - t0:.2f} s: {shoal.cluster_resources()}"
    )

    @shoal.remote
    def square(x: int) -> int:
        return x * x

    t0 = time.perf_counter()
    squares = shoal.get([square.remote(i) for i in range(1000)])
    print(f"1,000 tasks: sum of squares = {sum(squares)} in {time.perf_counter() - t0:.2f} s")

    @shoal.remote
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def increment(self) -> int:
            self.n += 1
            return self.n

    counter = Counter.remote()  # type: ignore[attr-defined]
    for _ in range(5):
        counter.increment.remote()
    print(f"An actor counted to {shoal.get(counter.increment.remote())}")

    @shoal.remote
    def greet(name: str) -> str:
        print(f"hello, {name}, from a worker process")
        return name

    shoal.get(greet.remote("demo"))

    @shoal.remote
    def divide(a: float, b: float) -> float:
        return a / b

    try:
        shoal.get(divide.remote(1, 0))
    except ZeroDivisionError as exc:
        print("A remote error, caught with `except ZeroDivisionError`:")
        print("    " + str(exc).replace("\n", "\n    "))
    shoal.shutdown()
    print("Cluster stopped; nothing is left running.")


if __name__ == "__main__":
    run()
