"""`vlctl status`'s rank table for a job of any size."""

from __future__ import annotations


def test_a_large_jobs_rank_table_shows_the_ranks_worth_a_look_and_fits_a_terminal() -> None:
    """Past STATUS_TABLE_MAX_RANKS the table leads with the flagged ranks, then those furthest behind, then the
    slowest own work, and one caption line sums up the rest (16,384 ranks print as 32 rows; 3 of the 2,048 nodes are all in them)."""
    from rich.console import Console

    from cli.jobs import STATUS_TABLE_MAX_RANKS, _rank_table
    from controller.views import RankView

    ranks = tuple(
        RankView(
            rank=r,
            node=f"node-{r // 8}",
            step=97 if r == 4000 else 100,
            own_work_s=1.3 if r == 9000 else 0.9 + r * 1e-6,
            flagged=r == 12000,
        )
        for r in range(16384)
    )
    console = Console(width=200, record=True)
    console.print(_rank_table(ranks))
    text = console.export_text()
    lines = [line.split() for line in text.splitlines() if line.strip()]
    rows = [cells for cells in lines if cells[0].isdigit()]
    assert len(rows) == STATUS_TABLE_MAX_RANKS
    assert [int(cells[0]) for cells in rows[:3]] == [12000, 4000, 9000]
    assert int(rows[3][0]) == 16383  # then the slowest of the rest
    caption = " ".join(text.split())  # rich wraps the caption to the table's width
    assert "16352 more ranks on 2045 nodes, step 100," in caption and "--output json lists all" in caption
    small = Console(width=200, record=True)
    small.print(_rank_table(ranks[:8]))
    assert "more ranks" not in small.export_text()
