"""The shape of the house, as rules a reader can check: rooms by concept that import no script, scripts
that import only the algorithm from each other, pure functions that name their shapes, mirrored pairs
whose shared Config fields read the same, no circles, and a repository that cites its own documents.
(A soft size ceiling stays; a room holds one concept, not a line budget.)"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOMS = {"fsdp_utils", "train_utils", "data", "model", "task", "evaluation", "checkpoint"}  # concepts, not scripts
SCRIPTS = {"sft", "gvm", "reward_model", "dvpo", "ppo_baseline", "grpo_baseline", "dpo_baseline"}  # the recipes
MIRRORS = [("dvpo", "ppo_baseline"), ("dvpo", "grpo_baseline"), ("gvm", "reward_model")]
# fields whose comments differ on purpose: the GVM also reads scored rows (the comments say so)
MIRROR_EXCEPTIONS = {("gvm", "reward_model"): {"data", "batch_size", "micro_batch_size"}}
SOFT_CEILING = 600  # lines per file: a file this long probably holds two concepts


def top_level() -> dict:
    """module name -> parsed source of every top-level .py file."""
    return {f[:-3]: ast.parse(open(os.path.join(ROOT, f)).read()) for f in os.listdir(ROOT) if f.endswith(".py")}


def imports(tree: ast.Module, ours: set) -> set:
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module.split(".")[0])
    return found & ours


def test_the_rooms_and_scripts_are_where_a_reader_expects_them():
    mods = top_level()
    assert ROOMS <= set(mods) and {"sft", "gvm", "reward_model", "dvpo", "ppo_baseline", "bench"} <= set(mods)
    assert set(mods) <= ROOMS | SCRIPTS | {"bench"}, set(mods) - ROOMS - SCRIPTS  # every file is named here


def test_no_circles_and_rooms_import_no_script():
    mods = top_level()
    deps = {m: imports(t, set(mods)) - {m} for m, t in mods.items()}
    for room in ROOMS:
        assert not deps[room] & (SCRIPTS | {"bench"}), (room, deps[room])

    def reach(m, seen=()):
        for d in deps[m]:
            assert d not in seen + (m,), f"import circle: {' -> '.join(seen + (m, d))}"
            reach(d, seen + (m,))

    for m in mods:
        reach(m)


def pure_section(tree: ast.Module, src: str) -> list:
    """The functions between a '# Pure functions' section comment and the next section comment."""
    lines = src.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# Pure functions")), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("# ") and lines[i - 1].startswith(
        "# ---")), len(lines))
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and start < n.lineno - 1 < end]


def test_scripts_have_a_pure_section_whose_functions_name_their_shapes():
    mods = top_level()
    for name in SCRIPTS & set(mods):
        fns = pure_section(mods[name], open(os.path.join(ROOT, name + ".py")).read())
        assert fns, f"{name}.py has no '# Pure functions' section"
        for fn in fns:
            doc = ast.get_docstring(fn) or ""
            assert re.search(r"\((B|N)\b|scalars", doc), f"{name}.py:{fn.lineno} {fn.name}: no shapes in its docstring"
            args = {a.arg for a in fn.args.args}
            assert "cfg" not in args, f"{name}.py:{fn.lineno} {fn.name} takes cfg: not copy-pasteable"


def test_scripts_import_only_the_algorithm_from_each_other():
    """A script imports from another script only names from that script's pure-functions section
    (bench.py, a shorter version of the scripts, imports them whole)."""
    mods = top_level()
    pure = {m: {f.name for f in pure_section(t, open(os.path.join(ROOT, m + ".py")).read())}
            for m, t in mods.items() if m in SCRIPTS}
    for name, tree in mods.items():
        if name == "bench":
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                assert not {a.name for a in n.names} & SCRIPTS, f"{name}.py imports a whole script"
            if isinstance(n, ast.ImportFrom) and n.module in SCRIPTS:
                names = {a.name for a in n.names}
                assert names <= pure[n.module], (name, names - pure[n.module])


def test_no_room_function_takes_a_scripts_config():
    for name, tree in top_level().items():
        if name not in ROOMS:
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                assert "cfg" not in {a.arg for a in fn.args.args}, f"{name}.py:{fn.lineno} {fn.name}(cfg)"


def config_comments(name: str) -> dict:
    """Config field -> (default source, trailing comment) of a script's @dataclass Config."""
    src = open(os.path.join(ROOT, name + ".py")).read().splitlines()
    cls = next(n for n in top_level()[name].body if isinstance(n, ast.ClassDef) and n.name == "Config")
    out = {}
    for n in cls.body:
        if isinstance(n, ast.AnnAssign):
            line = src[n.lineno - 1]
            out[n.target.id] = line.split("#", 1)[1].strip() if "#" in line else ""
    return out


def test_mirrored_pairs_share_their_config_vocabulary():
    """Fields two mirrored scripts share are commented alike, so that `diff` shows only the method."""
    mods = top_level()
    for a, b in MIRRORS:
        if a not in mods or b not in mods:
            continue
        ca, cb = config_comments(a), config_comments(b)
        shared = set(ca) & set(cb) - MIRROR_EXCEPTIONS.get((a, b), set()) - {"out_dir"}
        assert len(shared) >= 10, (a, b, shared)
        differ = {f: (ca[f], cb[f]) for f in shared if ca[f] != cb[f]}
        assert not differ, (a, b, differ)
        order_a = [f for f in ca if f in shared]
        assert order_a == [f for f in cb if f in shared], (a, b, "shared fields in a different order")


def test_file_and_line_lengths():
    for dirpath in (ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")):
        for f in sorted(os.listdir(dirpath)):
            if f.endswith(".py"):
                lines = open(os.path.join(dirpath, f)).read().splitlines()
                if dirpath == ROOT:
                    assert len(lines) <= SOFT_CEILING, (f, len(lines))
                long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
                assert not long, (f, long)


def test_imports_at_the_top():
    """In-function imports only for optional dependencies, marked as such in a comment."""
    for name, tree in top_level().items():
        src = open(os.path.join(ROOT, name + ".py")).read().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        assert "optional" in src[n.lineno - 1], f"{name}.py:{n.lineno}: import inside {fn.name}()"


def test_cites_its_own_documents():
    cited, spec = set(), "DESIGN" + ".md"  # the spec this project was built from is not in the repository
    for dirpath, _, files in os.walk(ROOT):
        if ".git" in dirpath or "out" in dirpath.split(os.sep):
            continue
        for f in files:
            if f.endswith((".py", ".md", ".sh")):
                text = open(os.path.join(dirpath, f), errors="ignore").read()
                assert spec not in text, os.path.join(dirpath, f)
                cited |= set(re.findall(r"docs/algorithm\.md §(\d+)", text))
    sections = set(re.findall(r"^## (\d+)\. ", open(os.path.join(ROOT, "docs", "algorithm.md")).read(), re.M))
    assert cited and cited <= sections, cited - sections  # every cited section exists
