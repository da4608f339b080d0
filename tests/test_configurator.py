"""configurator.py: nanoGPT's --key=value mechanism without its type traps."""

import os
import sys

import pytest

from conftest import REPO

import configurator


def configure(argv, **defaults):
    """configure() on a namespace holding `defaults`, as a stage script calls it on its globals."""
    g = dict(defaults) or dict(batch_size=12, learning_rate=6e-4, max_iters=5000, compile_model=False,
                               out_dir='out', init_from='scratch', wandb_run_name=None, betas=(0.9, 0.95))
    g['config'] = configurator.configure(g, argv)
    return g


def test_int_accepted_for_float_key():
    g = configure(['--learning_rate=1'])
    assert g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)


def test_integral_float_accepted_for_int_key():
    g = configure(['--max_iters=1e5'])
    assert g['max_iters'] == 100000 and isinstance(g['max_iters'], int)


def test_non_integral_float_rejected_for_int_key():
    with pytest.raises(SystemExit, match="max_iters=1.5 is not a valid int"):
        configure(['--max_iters=1.5'])


def test_value_containing_equals_sign():
    g = configure(['--out_dir=runs/a=b'])
    assert g['out_dir'] == 'runs/a=b'


def test_string_key_takes_text_as_is():
    g = configure(['--out_dir=123', '--init_from=out-tiny'])
    assert g['out_dir'] == '123' and g['init_from'] == 'out-tiny'


def test_none_default_accepts_any_type():
    assert configure(['--wandb_run_name=7'])['wandb_run_name'] == 7
    assert configure(['--wandb_run_name=run-a'])['wandb_run_name'] == 'run-a'


@pytest.mark.parametrize('text,value', [('true', True), ('False', False), ('True', True), ('1', True), ('0', False)])
def test_bool_spellings(text, value):
    assert configure([f'--compile_model={text}'])['compile_model'] is value


def test_bool_rejects_other_values():
    with pytest.raises(SystemExit, match='not a valid bool'):
        configure(['--compile_model=maybe'])


def test_unknown_key_names_closest_known_keys():
    with pytest.raises(SystemExit, match="unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        configure(['--learning_rat=1e-3'])


def test_tuple_key():
    assert configure(['--betas=(0.9, 0.99)'])['betas'] == (0.9, 0.99)


def test_config_file_sets_known_keys_and_coerces(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("batch_size = 4\nlearning_rate = 1\nmax_iters = 2e3\n")
    g = configure([str(path), '--batch_size=8'])
    assert g['batch_size'] == 8 and g['learning_rate'] == 1.0 and g['max_iters'] == 2000
    assert g['config']['batch_size'] == 8  # the effective config for saving


def test_config_file_unknown_key_names_file_and_line(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("batch_size = 4\n\nbatchsize = 8\n")
    with pytest.raises(SystemExit, match=r"cfg.py:3: unknown config key 'batchsize'; did you mean 'batch_size'"):
        configure([str(path)])


def test_config_file_wrong_type_names_file_and_line(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text("import math\nmax_iters = 'many'\n")
    with pytest.raises(SystemExit, match=r"cfg.py:2: max_iters='many' is not a valid int"):
        configure([str(path)])


def test_argument_without_value_is_an_error():
    with pytest.raises(SystemExit, match='expected --key=value'):
        configure(['--compile'])


def test_renamed_and_removed_keys_say_what_replaced_them():
    with pytest.raises(SystemExit, match="unknown config key 'compile'; did you mean 'compile_model'"):
        configure(['--compile=False'])
    with pytest.raises(SystemExit, match="'always_save_checkpoint' is no longer a config key: ckpt.pt is now always"):
        configure(['--always_save_checkpoint=True'])
