"""Which examples make each training batch: a global, topology-free index sampler.

No TensorFlow, no JAX: plain numpy, below the TensorFlow side of jaxsft.data (grain's
IndexSampler with ShardByJaxProcess, reduced to what jaxsft needs). The global batch at step
s is a function of (number of examples, seed, global batch size, s) only:
- epoch e = s // steps_per_epoch visits the examples in `epoch_order(e)`, a permutation of
  0..n-1 seeded by (seed, e) (NumPy's PCG64 `permutation`);
- global batch s is that order's slice [b*B, (b+1)*B) with b = s % steps_per_epoch, B the
  global batch; the last n % B examples of each epoch's order are dropped;
- process p of P reads the contiguous part [p*B/P, (p+1)*B/P) of every global batch and
  splits it over its local devices in order.
So the concatenated parts of all processes are the same global batch whatever P and the
device counts, and the sampler's whole state is the step: a checkpoint's "data_position"
restarts the stream on any cluster shape, with nothing read or decoded for the steps skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class IndexSampler:
    """The global batches of a training run over `num_examples` examples."""

    num_examples: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of epoch `epoch`, in the order they are batched (int64)."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        return rng.permutation(self.num_examples).astype(np.int64)

    def global_batch_indices(self, step: int) -> np.ndarray:
        """The example indices of global batch `step`, in batch order."""
        epoch, b = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[b * self.global_batch:(b + 1) * self.global_batch]

    def local_batches(
        self, start_step: int, process_index: int, process_count: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, this process's example indices) for steps start_step, start_step+1, ...,
        forever; one permutation computed per epoch, none for the epochs skipped."""
        local = self.global_batch // process_count
        first = process_index * local
        spe, step = self.steps_per_epoch, start_step
        while True:
            epoch, skip = divmod(step, spe)
            order = self.epoch_order(epoch)
            for b in range(skip, spe):
                start = b * self.global_batch + first
                yield epoch, order[start:start + local]
            step = (epoch + 1) * spe
