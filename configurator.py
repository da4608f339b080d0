"""
Poor man's configurator, after nanoGPT's, minus its type traps. Every stage script ends its
config globals with

    config = configure(globals())  # overrides from config files and --key=value arguments

Then `python train.py config/pretrain_tiny.py --batch_size=4` first runs the config file, then
applies each --key=value. The known keys are the script's globals of plain types (int, float,
bool, str, tuple, list, dict or None) not starting with '_'.

Rules, each a trap in the original:
- an unknown key is an error that names the closest known keys, on the command line and in a
  config file alike (a config file runs in its own namespace and may only set known keys);
- an int is accepted for a float key; an integral float ('1e5') for an int key;
- 'true'/'false' (any case) work for bools; for a str key the text is taken as is;
- a value may contain '='; a key whose default is None takes any value.
configure() returns the effective configuration (a dict), for printing and saving.
"""

import ast
import builtins
import difflib
import sys


def _coerce(key, value, default, where):
    """Check/convert `value` for `key` against the type of its default; raise with `where`."""
    def fail(expected):
        raise SystemExit(f"{where}: {key}={value!r} is not a valid {expected} (default is {default!r})")
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail('bool')
    if isinstance(default, int):
        if isinstance(value, bool):
            fail('int')
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail('int')
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail('float')
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        fail('str')
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if isinstance(default, dict) and isinstance(value, dict):
        return value
    fail(type(default).__name__)


def _parse_literal(text):
    """Command-line text -> Python value: a literal when it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# nanoGPT's names (or ours before) that shadowed a builtin or a module, and what they are now
RENAMED = {'compile': ['compile_model'], 'input': ['sources'], 'tokenizer': ['tokenizer_type'],
           'tasks': ['write_tasks', 'score_tasks'], 'num_threads': ['num_proc'],
           'loss_norm': ['loss_type']}
REMOVED = {'always_save_checkpoint': "ckpt.pt is now always the latest state, and best.pt the best"}


def _unknown(key, known, where):
    if key in REMOVED:
        return SystemExit(f"{where}: {key!r} is no longer a config key: {REMOVED[key]}")
    close = [k for k in RENAMED.get(key, []) if k in known] or difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ''
    return SystemExit(f"{where}: unknown config key {key!r}{hint}")


def _apply_config_file(path, g, known):
    with open(path) as f:
        source = f.read()
    print(f"Overriding config with {path}:\n{source}")
    namespace = {k: g[k] for k in known}
    exec(builtins.compile(source, path, "exec"), namespace)  # `compile` may be a config key
    # where each name was assigned, so an error can name the line
    lines = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        lines.setdefault(n.id, node.lineno)
    for key, value in namespace.items():
        if key.startswith('_') or type(value).__name__ in ('module', 'function', 'type', 'builtin_function_or_method'):
            continue
        where = f"{path}:{lines.get(key, '?')}"
        if key not in known:
            raise _unknown(key, known, where)
        g[key] = _coerce(key, value, g[key], where)


def _apply_arg(arg, g, known):
    key, value = arg[2:].split('=', 1)  # split once: the value may contain '='
    if key not in known:
        raise _unknown(key, known, f"argument {arg!r}")
    default = g[key]
    parsed = value if isinstance(default, str) else _parse_literal(value)
    if isinstance(default, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in '\'"':
        parsed = value[1:-1]  # --out_dir="'x'" style quoting
    g[key] = _coerce(key, parsed, default, f"argument {arg!r}")
    print(f"Overriding: {key} = {g[key]!r}")


def configure(g, argv=None):
    """Apply config files and --key=value args (argv, default sys.argv[1:]) to the globals dict
    g; return the effective config."""
    argv = sys.argv[1:] if argv is None else argv
    known = [k for k, v in g.items() if not k.startswith('_') and
             (v is None or isinstance(v, (int, float, bool, str, tuple, list, dict)))]
    for arg in argv:
        if not arg.startswith('--'):
            _apply_config_file(arg, g, known)
        elif '=' in arg:
            _apply_arg(arg, g, known)
        else:
            raise SystemExit(f"argument {arg!r}: expected --key=value")
    return {k: g[k] for k in known}

