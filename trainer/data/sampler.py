"""Which global rows each optimizer step, and each data-parallel rank within it, trains on.

The rows of successive epochs form one stream: epoch 0's rows, then epoch 1's, and so on. A position in the
stream is (epoch, row). Step s takes the next `rows_per_step` rows; rank k of `dp_size` takes the step's rows
k, k + dp_size, k + 2 * dp_size, ... So:

- the global batch is the same whatever dp_size is, and one position, the first row of the next step, is all the
  state a resume needs, at any dp_size;
- a step may span an epoch boundary (no rows are dropped or repeated at the end of an epoch);
- interleaving rather than contiguous blocks gives each rank rows from the whole step, so ranks see similar
  mixes if the plan ever clusters long samples.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple

from trainer.data.packing import DROP_REASONS, CostTable, EpochPlan, PackingConfig, RowPlan, plan_epoch

PLANS_KEPT = 3  # the current epoch, the next one (prefetch reaches into it) and one spare


class Position(NamedTuple):
    epoch: int
    row: int


class RowStream:
    """The stream of planned rows over epochs; plans are computed on first use and a few are kept."""

    def __init__(self, table: CostTable, packing: PackingConfig, *, seed: int, shuffle: bool):
        self.table, self.packing, self.seed, self.shuffle = table, packing, seed, shuffle
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()

    def plan(self, epoch: int) -> EpochPlan:
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        plan = plan_epoch(self.table, self.packing, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        if plan.num_rows == 0:
            counts = Counter(DROP_REASONS[k] for k in plan.drop_reason.tolist())
            reasons = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
            raise ValueError(
                f"data: epoch {epoch} has no rows: all {len(self.table)} samples were dropped "
                f"({reasons or 'the dataset is empty'}); check row_len and max_vision_tokens_per_row"
            )
        self._plans[epoch] = plan
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def advance(self, position: Position, rows: int) -> Position:
        """The position `rows` rows further on."""
        epoch, row = position.epoch, position.row + rows
        while row >= (n := self.plan(epoch).num_rows):
            epoch, row = epoch + 1, row - n
        return Position(epoch, row)

    def row(self, position: Position) -> RowPlan:
        return self.plan(position.epoch).row(position.row)

    def rank_rows(
        self, step_start: Position, *, rows_per_step: int, dp_rank: int, dp_size: int
    ) -> list[Position]:
        """Positions of the rows rank `dp_rank` trains in the step starting at `step_start`, in order."""
        positions = [self.advance(step_start, dp_rank)]
        while len(positions) < rows_per_step // dp_size:
            positions.append(self.advance(positions[-1], dp_size))
        return positions
