"""The Sudoku generator, the built-in model's solve rate, and `mlx-diffgemma demo sudoku`."""

import json
import random

import pytest
from typer.testing import CliRunner

from mlx_diffgemma.command.cli import app
from mlx_diffgemma import sudoku

SHIPPED = (sudoku.MODEL_DIR / "config.json").is_file()


@pytest.mark.parametrize("n, givens", [(9, 40), (9, 30), (6, 14), (6, 11), (4, 6)])
def test_generated_puzzles_have_one_solution_and_the_stated_givens(n, givens):
    rng = random.Random(givens)
    for _ in range(5):
        puzzle, solution = sudoku.generate_puzzle(givens, rng, n)
        assert len(puzzle) == n * n and sum(1 for d in puzzle if d) == givens
        assert sudoku.count_solutions(puzzle) == (1, solution)
        assert sudoku.is_valid_solution(puzzle, solution)


@pytest.mark.parametrize("n, givens", [(9, 36), (6, 14)])
def test_symmetries_give_a_different_puzzle_with_one_solution(n, givens):
    rng = random.Random(0)
    puzzle, solution = sudoku.generate_puzzle(givens, rng, n)
    p, s = sudoku.transform(puzzle, solution, rng)
    assert p != puzzle and sum(map(bool, p)) == givens
    assert sudoku.count_solutions(p) == (1, s)


def test_solution_check_catches_broken_rules_and_givens():
    puzzle, solution = sudoku.generate_puzzle(40, random.Random(1))
    assert sudoku.is_valid_solution(puzzle, solution)
    swapped = list(solution)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # breaks columns and maybe a given
    assert not sudoku.is_valid_solution(puzzle, swapped)
    assert sudoku.conflicts(solution) == set()
    broken = list(solution)
    broken[1] = broken[0]  # now cells 0 and 1 repeat a digit in row 1 (and may clash elsewhere)
    assert {0, 1} <= sudoku.conflicts(broken)
    assert not sudoku.is_valid_solution(puzzle, solution[:80] + [0])


def test_parse_grid_reads_drawn_grids_and_rejects_bad_ones():
    for n in (9, 6):
        puzzle, _ = sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["easy"], random.Random(2), n)
        drawn = sudoku.render(puzzle)
        assert sudoku.parse_grid(drawn) == puzzle
        assert sudoku.parse_grid(sudoku.format_grid(puzzle).replace("0", ".")) == puzzle
    with pytest.raises(ValueError, match="81 cells"):
        sudoku.parse_grid("123")
    with pytest.raises(ValueError, match="digits 1-6"):
        sudoku.parse_grid("7" + "0" * 35)
    with pytest.raises(ValueError, match="repeats 1 at row 1 column 1 and row 1 column 2"):
        sudoku.parse_grid("11" + "0" * 79)


def test_dataset_lines_are_prompt_completion_pairs(tmp_path):
    sudoku.write_dataset(tmp_path / "train.jsonl", 6, 40, seed=0, transforms=3)
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        puzzle, solution = sudoku.parse_grid(line["prompt"]), [int(c) for c in line["completion"]]
        assert sudoku.is_valid_solution(puzzle, solution)


@pytest.mark.skipif(not SHIPPED, reason="the built-in Sudoku model is not shipped")
def test_shipped_model_solves_held_out_puzzles_at_its_reported_rate():
    """A fixed held-out set (a seed no training file used), default sampler settings."""
    report = json.loads((sudoku.MODEL_DIR / "results.json").read_text())
    model = sudoku.load_model()
    n, level = sudoku.grid_size(model), report["test_level"]
    rng = random.Random(4242)
    puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n][level], rng, n)[0] for _ in range(20)]
    attempts = sudoku.solve(model, puzzles, seed=0)
    rate = sum(a.solved for a in attempts) / len(attempts)
    assert rate >= report["results"][level]["solve_rate"] - 0.15, rate


@pytest.mark.skipif(not SHIPPED, reason="the built-in Sudoku model is not shipped")
def test_demo_solves_a_given_puzzle_offline():
    n = sudoku.grid_size(sudoku.load_model())
    puzzle, solution = sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["easy"] + 2, random.Random(7), n)
    result = CliRunner().invoke(app, ["demo", "sudoku", "--puzzle", sudoku.format_grid(puzzle), "--seed", "0", "--no-draft"])
    assert "denoising" not in result.output
    assert ("solved:" in result.output) == (result.exit_code == 0)
    assert "steps" in result.output
    result = CliRunner().invoke(app, ["demo", "sudoku", "--seed", "3", "--delay", "0"])  # a generated puzzle
    assert "givens" in result.output and "steps" in result.output and result.exit_code in (0, 2)


@pytest.mark.skipif(not SHIPPED, reason="the built-in Sudoku model is not shipped")
def test_demo_rejects_a_bad_puzzle_in_one_line():
    result = CliRunner().invoke(app, ["demo", "sudoku", "--puzzle", "12345"])
    assert result.exit_code == 1
    assert "81 cells" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["demo", "sudoku", "--difficulty", "impossible"])
    assert result.exit_code == 1 and "unknown difficulty" in result.output


def test_the_rule_automaton_accepts_the_solution_and_refuses_a_repeat_in_a_row_or_box():
    puzzle, solution = sudoku.generate_puzzle(11, random.Random(5), 6)
    automaton = sudoku.rule_automaton(puzzle, len(sudoku.VOCAB))
    state = automaton.advance(automaton.start, sudoku.completion_ids(solution))
    assert automaton.distance[state] == 0  # accepting
    with pytest.raises(ValueError):  # digits relabelled: rows and boxes still fine, but the givens changed
        automaton.advance(automaton.start, sudoku.completion_ids([d % 6 + 1 for d in solution]))
    free = [i for i in range(6) if not puzzle[i]]  # empty cells of the first row
    repeated = list(solution)
    repeated[free[0]] = repeated[free[1]]  # a digit twice in the first row
    with pytest.raises(ValueError):
        automaton.advance(automaton.start, sudoku.completion_ids(repeated))


def test_rule_constrained_attempts_keep_givens_and_repeat_no_digit_in_rows_or_boxes():
    model = sudoku.load_model()
    rng = random.Random(11)
    puzzles = [sudoku.generate_puzzle(11, rng, 6)[0] for _ in range(4)]
    for attempt in sudoku.solve(model, puzzles, seed=0, rules=True, steps=4):
        grid, puzzle = attempt.grid, attempt.puzzle
        assert all(g == p for g, p in zip(grid, puzzle) if p)
        rows = [grid[r * 6 : r * 6 + 6] for r in range(6)]
        boxes = [[grid[(br + i) * 6 + bc + j] for i in range(2) for j in range(3)] for br in (0, 2, 4) for bc in (0, 3)]
        assert all(sorted(unit) == [1, 2, 3, 4, 5, 6] for unit in rows + boxes)


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="the built-in Sudoku model is not shipped")
def test_tries_denoise_only_the_unsolved_puzzles_again():
    model = sudoku.load_model()
    n = sudoku.grid_size(model)
    rng = random.Random(77)
    puzzles = [sudoku.generate_puzzle(sudoku.DIFFICULTIES[n]["hard"], rng, n)[0] for _ in range(20)]
    once = sudoku.solve(model, puzzles, seed=0, steps=12)  # 12 steps a canvas (default 48): a short test
    thrice = sudoku.solve(model, puzzles, seed=0, tries=3, steps=12)
    assert not all(a.solved for a in once)  # hard puzzles: some fail at the first try
    for a, b in zip(once, thrice):
        if a.solved:  # the first try is the same canvas; a solved puzzle is not tried again
            assert (b.grid, b.steps, b.tries) == (a.grid, a.steps, 1)
        else:
            assert b.tries >= 2 and b.steps > a.steps
            assert b.solved or b.tries == 3
    assert sum(b.solved for b in thrice) > sum(a.solved for a in once)
    with pytest.raises(ValueError, match="tries must be at least 1"):
        sudoku.solve(model, puzzles, tries=0)
