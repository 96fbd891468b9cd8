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
    assert "16352 more ranks on 2045 nodes, step 100," in caption and "--ranks all lists all" in caption
    small = Console(width=200, record=True)
    small.print(_rank_table(ranks[:8]))
    assert "more ranks" not in small.export_text()


def _large_job(flagged_node: int = 1500):
    from controller.views import RankView

    return tuple(
        RankView(
            rank=r,
            node=f"node-{r // 8}",
            step=97 if r // 8 == 700 else 100,
            own_work_s=1.3 if r // 8 == flagged_node else 0.9,
            flagged=r // 8 == flagged_node and r % 8 < 6,
        )
        for r in range(16384)
    )


def test_a_large_jobs_status_leads_with_its_nodes_and_all_lists_every_rank() -> None:
    from rich.console import Console

    from cli.jobs import STATUS_TABLE_MAX_NODES, _node_table, _rank_table

    ranks = _large_job()
    console = Console(width=200, record=True)
    console.print(_node_table(ranks))
    text = console.export_text()
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("node-")]
    assert len(rows) == STATUS_TABLE_MAX_NODES
    assert rows[0] == ["node-1500", "8", "100", "1.300", "1.300", "6"]  # flagged ranks first
    assert rows[1][:3] == ["node-700", "8", "97"]  # then the furthest behind
    assert f"{2048 - STATUS_TABLE_MAX_NODES} more nodes" in text
    every = Console(width=200, record=True)
    # rich takes seconds for 16,384 rows: 512 say as much
    every.print(_rank_table(ranks[:512], every_rank=True))
    lines = [line.split() for line in every.export_text().splitlines()]
    numbers = [int(cells[0]) for cells in lines if cells[:1] and cells[0].isdigit()]
    assert numbers == list(range(512))


def test_status_json_of_a_large_job_streams_a_rank_a_line_and_parses(capsys) -> None:
    import json

    from cli.output import OutputFormat, emit

    data = {
        "name": "big",
        "step": 100,
        "ranks": [{"rank": r, "node": f"node-{r // 8}"} for r in range(16384)],
    }
    emit(data, OutputFormat.json, lambda _: None)
    out = capsys.readouterr().out
    assert json.loads(out) == data
    lines = out.splitlines()
    assert len(lines) == 4 + 16384 + 2  # {, name, step, "ranks": [, a line per rank, ], }
    assert json.loads(lines[4 + 100].rstrip(",")) == {"rank": 100, "node": "node-12"}
