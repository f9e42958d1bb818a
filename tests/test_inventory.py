"""The hosts file: lookup order, validation, and an error naming file, line, host, field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetrun.core.errors import InventoryError, UnknownHostError
from fleetrun.core.inventory import DEFAULT_SOURCE, load_inventory, parse_inventory
from fleetrun.core.models import Limits
from fleetrun.core.plugin_manager import PluginManager

from conftest import REPO

TRANSPORTS = PluginManager(autoload=False).transports
NO_SUCH_USER = "fleetrun-no-such-user"


def parse(text: str):
    return parse_inventory(text, source="hosts.yaml", transports=TRANSPORTS)


def test_example_file_is_valid_and_shows_every_field():
    inventory = load_inventory(REPO / "hosts.example.yaml", TRANSPORTS)
    local = inventory.get("local")
    assert local.transport == "local" and local.tags == ("dev", "local")
    assert local.limits == Limits(max_seconds=600, max_output_bytes=10485760, max_concurrent=4, max_queued=1000)
    assert local.env == {"LC_ALL": "C.UTF-8"} and local.cwd == "/tmp"
    assert local.options == {"shell": "/bin/sh"}
    assert inventory.get("builder").limits.max_concurrent == 8  # from defaults
    text = (REPO / "hosts.example.yaml").read_text()
    from fleetrun.core.inventory import COMMON_HOST_FIELDS

    web1 = inventory.get("web1")
    assert (web1.transport, web1.options["host_key_checking"], web1.options["port"]) == ("ssh", "strict", 22)
    db1 = inventory.get("db1")
    assert db1.options["jump_host"] == "deploy@bastion.example.com:22"
    # db1 brings in x-ssh-defaults: shared fields written once.
    assert (db1.transport, db1.options["user"], db1.options["known_hosts"]) == ("ssh", "deploy", "~/.ssh/known_hosts")
    for field in [*COMMON_HOST_FIELDS, *TRANSPORTS["local"].host_fields, *TRANSPORTS["ssh"].host_fields, "defaults", "tags"]:
        assert f"{field}:" in text, f"hosts.example.yaml does not show {field!r}"


def test_defaults_then_host_fields():
    inventory = parse("defaults:\n  max_seconds: 5\nhosts:\n  a:\n  b:\n    max_seconds: 9\n")
    assert inventory.get("a").limits.max_seconds == 5
    assert inventory.get("b").limits.max_seconds == 9
    assert inventory.get("a").limits.max_output_bytes == Limits().max_output_bytes


def test_a_merge_key_brings_in_an_anchored_mapping_and_the_hosts_own_fields_win():
    inventory = parse(
        "hosts:\n"
        "  web1: &web\n    tags: [web]\n    max_seconds: 30\n    env: &env {LANG: C, TZ: UTC}\n"
        "  web2:\n    <<: *web\n    max_seconds: 60\n"
        "  web3:\n    <<: [*web, {max_concurrent: 2, max_seconds: 1}]\n    env:\n      <<: *env\n      TZ: CET\n"
    )
    web2, web3 = inventory.get("web2"), inventory.get("web3")
    assert (web2.tags, web2.limits.max_seconds, web2.env) == (("web",), 60, {"LANG": "C", "TZ": "UTC"})
    # The earlier-named mapping wins over the later one; the host's own keys over both.
    assert (web3.tags, web3.limits.max_seconds, web3.limits.max_concurrent) == (("web",), 30, 2)
    assert web3.env == {"LANG": "C", "TZ": "CET"}
    assert inventory.get("web1").env == {"LANG": "C", "TZ": "UTC"}


def test_shared_fields_live_under_an_x_key_that_is_otherwise_ignored():
    inventory = parse(
        "x-ssh: &ssh\n  transport: ssh\n  user: deploy\n  port: 2222\n"
        "x-notes: [anything, {at: all}]\n"
        "hosts:\n"
        "  web1:\n    <<: *ssh\n    hostname: 10.0.0.11\n"
        "  web2:\n    <<: *ssh\n    hostname: 10.0.0.12\n    port: 22\n"
    )
    assert list(inventory.hosts) == ["web1", "web2"]
    web1, web2 = inventory.get("web1"), inventory.get("web2")
    assert web1.transport == web2.transport == "ssh"
    assert (web1.options["user"], web1.options["port"], web1.options["hostname"]) == ("deploy", 2222, "10.0.0.11")
    assert (web2.options["port"], web2.options["hostname"]) == (22, "10.0.0.12")
    # What an x- key holds is checked where a host brings it in, on the line it is written.
    with pytest.raises(InventoryError) as info:
        parse("x-ssh: &ssh\n  transport: ssh\n  usr: deploy\nhosts:\n  web1:\n    <<: *ssh\n")
    assert str(info.value).startswith("hosts.yaml:3: host 'web1', field 'usr': unknown field for transport 'ssh'")


def test_names_and_text_fields_are_taken_as_written_not_as_yaml_numbers_or_booleans():
    inventory = parse(
        "hosts:\n"
        "  1:\n    tags: [2024, yes]\n    description: no\n"
        "  yes:\n    env: {DEBUG: yes, MODE: 0755, RATIO: 1.50, DAY: 2024-01-02, EMPTY: ''}\n"
        "  on:\n    transport: ssh\n    user: 1000\n    hostname: 10.0.0.1\n"
    )
    assert list(inventory.hosts) == ["1", "yes", "on"]
    assert (inventory.get("1").tags, inventory.get("1").description) == (("2024", "yes"), "no")
    assert inventory.get("yes").env == {"DEBUG": "yes", "MODE": "0755", "RATIO": "1.50", "DAY": "2024-01-02", "EMPTY": ""}
    assert inventory.get("on").options["user"] == "1000"
    # Numbers and booleans stay typed where the field is one.
    assert parse("hosts:\n  a:\n    transport: ssh\n    port: 22\n").get("a").options["port"] == 22


@pytest.mark.parametrize(
    "written, max_output_bytes, max_seconds",
    [("1e9", 1_000_000_000, 1e9), ("1.5E3", 1500, 1500), ("1.0e+9", 1_000_000_000, 1e9), ("2e-1", None, 0.2), ("250", 250, 250)],
)
def test_a_number_with_an_exponent_is_a_number_and_a_whole_one_an_integer(written, max_output_bytes, max_seconds):
    # YAML 1.1, which PyYAML reads, takes 1e9 as the text '1e9' and 1.0e+9 as a float: the
    # first was "expected an integer, got '1e9'", the second "got 1000000000.0".
    limits = parse(f"hosts:\n  a:\n    max_seconds: {written}\n").get("a").limits
    assert limits.max_seconds == max_seconds
    if max_output_bytes is None:
        with pytest.raises(InventoryError, match="field 'max_output_bytes': expected an integer, got 0.2"):
            parse(f"hosts:\n  a:\n    max_output_bytes: {written}\n")
    else:
        limits = parse(f"hosts:\n  a:\n    max_output_bytes: {written}\n").get("a").limits
        assert limits.max_output_bytes == max_output_bytes and type(limits.max_output_bytes) is int
    with pytest.raises(InventoryError, match=re.escape(f"field 'max_output_bytes': expected an integer, got '{written}'")):
        parse(f"hosts:\n  a:\n    max_output_bytes: '{written}'\n")  # quoted: text, as written


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts: [\n", "hosts.yaml:2: invalid YAML"),
        ("", "hosts.yaml:1: the file is empty"),
        ("- a\n- b\n", "hosts.yaml:1: the top level must be a mapping"),
        ("host:\n  a: {}\n", "hosts.yaml:1: unknown top-level key 'host' (allowed: defaults, tags, hosts, and x-NAME for anchors)"),
        ("x-: {}\nhosts:\n  a:\n", "hosts.yaml:1: unknown top-level key 'x-'"),
        ("hosts:\n\ta:\n", "hosts.yaml:2: invalid YAML: found character '\\t' that cannot start any token (YAML indents with spaces, never tabs)"),
        ("hosts:\n  ? [a, b]\n  : {}\n", "hosts.yaml:2: a key must be a name, not a list or a mapping"),
        ("hosts:\n  1:\n  '1':\n", "hosts.yaml:3: duplicate key '1'"),
        ("defaults:\n  max_seconds: 3\n", "hosts.yaml:1: missing the 'hosts:' mapping"),
        ("hosts: [a, b]\n", "hosts.yaml:1: 'hosts' must be a mapping"),
        ("hosts: {}\n", "hosts.yaml:1: 'hosts' is empty"),
        ("hosts:\n  'bad name':\n", "hosts.yaml:2: host 'bad name': invalid host name"),
        ("hosts:\n  héllo:\n", "hosts.yaml:2: host 'héllo': invalid host name: use ASCII letters, digits"),
        ("hosts:\n  a: 3\n", "hosts.yaml:2: host 'a': a host must be a mapping"),
        ("hosts:\n  a:\n    tags: [x]\n  a:\n    tags: [y]\n", "hosts.yaml:4: duplicate key 'a'"),
        ("hosts:\n  a:\n    prot: 22\n", "hosts.yaml:3: host 'a', field 'prot': unknown field for transport 'local'"),
        ("hosts:\n  a:\n    transport: ftp\n", "hosts.yaml:3: host 'a', field 'transport': unknown transport 'ftp' (available: local, ssh)"),
        ("hosts:\n  a:\n    transport: 3\n", "hosts.yaml:3: host 'a', field 'transport': unknown transport '3'"),
        ("hosts:\n  a:\n    transport: [ssh]\n", "hosts.yaml:3: host 'a', field 'transport': expected a string, got 'list'"),
        ("hosts:\n  a:\n    max_seconds: soon\n", "hosts.yaml:3: host 'a', field 'max_seconds': expected a number, got 'soon'"),
        ("hosts:\n  a:\n    max_seconds: -1\n", "hosts.yaml:3: host 'a', field 'max_seconds': must be greater than 0, got -1"),
        ("hosts:\n  a:\n    max_seconds: .inf\n", "hosts.yaml:3: host 'a', field 'max_seconds': expected a finite number, got inf"),
        ("hosts:\n  a:\n    transport: ssh\n    connect_timeout: .nan\n", "hosts.yaml:4: host 'a', field 'connect_timeout': expected a finite number, got nan"),
        ("hosts:\n  a:\n    max_output_bytes: 1.5\n", "hosts.yaml:3: host 'a', field 'max_output_bytes': expected an integer, got 1.5"),
        ("hosts:\n  a:\n    max_concurrent: true\n", "hosts.yaml:3: host 'a', field 'max_concurrent': expected an integer, got True"),
        ("hosts:\n  a:\n    max_concurrent: 0\n", "hosts.yaml:3: host 'a', field 'max_concurrent': must be greater than 0, got 0"),
        ("hosts:\n  a:\n    max_queued: -5\n", "hosts.yaml:3: host 'a', field 'max_queued': must be greater than 0, got -5"),
        # The store keeps it in a 64-bit column: a bigger one lost the task's record.
        (
            "hosts:\n  a:\n    max_output_bytes: 10000000000000000000\n",
            "hosts.yaml:3: host 'a', field 'max_output_bytes': must be at most 1000000000000000000, got 10000000000000000000",
        ),
        ("hosts:\n  a:\n    max_seconds: 1e999\n", "hosts.yaml:3: host 'a', field 'max_seconds': expected a finite number, got inf"),
        ("hosts:\n  a:\n    tags: web\n", "hosts.yaml:3: host 'a', field 'tags': expected a list of strings, got 'web'"),
        ("hosts:\n  a:\n    tags:\n      - ok\n      - [nested]\n", "hosts.yaml:5: host 'a', field 'tags': every item must be a non-empty string"),
        ("hosts:\n  a:\n    tags: ['has space']\n", "hosts.yaml:3: host 'a', field 'tags': invalid tag 'has space'"),
        ("hosts:\n  a:\n    tags: [\"x\x07\"]\n", "hosts.yaml:3: invalid YAML: character 0x0007 is not allowed in YAML"),
        ("hosts:\n  a: *web\n", "hosts.yaml:2: invalid YAML: found undefined alias 'web'"),
        ("hosts:\n  a:\n    transport: !vault |\n      x\n", "hosts.yaml:3: host 'a', field 'transport': could not determine a constructor for the tag '!vault'"),
        ("hosts:\n  a: &a\n    tags: [x, *a]\n", "hosts.yaml:3: host 'a', field 'tags': a value that contains itself"),
        # PyYAML builds a tagged value without checking it fits the tag: these were tracebacks.
        *(
            (f"hosts:\n  a:\n    max_seconds: {value}\n",
             f"hosts.yaml:3: host 'a', field 'max_seconds': {shown} cannot be read as {tag}; leave the tag out")
            for value, shown, tag in [
                ("!!int x", "'x'", "!!int"), ("!!int ''", "''", "!!int"), ("!!float 1e", "'1e'", "!!float"),
                ("!!bool maybe", "'maybe'", "!!bool"), ("!!timestamp x", "'x'", "!!timestamp"),
                ("!!timestamp 2024-13-01", "'2024-13-01'", "!!timestamp"),
            ]
        ),
        ("hosts:\n  a:\n    env: [A=1]\n", "hosts.yaml:3: host 'a', field 'env': expected a mapping of names to strings"),
        ("hosts:\n  a:\n    env:\n      A: x\n      A: y\n", "hosts.yaml:5: host 'a', field 'env': duplicate key 'A'"),
        ("hosts:\n  a:\n    <<: [1]\n", "hosts.yaml:3: host 'a': a merge key '<<' takes a mapping (*anchor) or a list of them"),
        ("hosts:\n  a:\n    <<: {tags: [x]}\n    <<: {cwd: /}\n", "hosts.yaml:4: host 'a': duplicate merge key '<<'"),
        ("hosts:\n  a: &a\n    <<: *a\n", "hosts.yaml:3: host 'a': a merge key '<<' that brings in the mapping it is part of"),
        ("x-a: &x {}\nx-b: &x {}\nhosts:\n  a:\n", "hosts.yaml:2: invalid YAML: found duplicate anchor 'x' (first on line 1)"),
        ("hosts:\n  a:\n---\nhosts:\n  b:\n", "hosts.yaml:3: invalid YAML: a second document (after ---); the file must hold one"),
        (
            "hosts:\n  a:\n    tags: " + "[" * 101 + "]" * 101 + "\n",
            "hosts.yaml:3: lists and mappings nested more than 100 levels deep",
        ),
        (
            "x-m0: &m0 {cwd: /}\n" + "".join(f"x-m{i}: &m{i} {{<<: *m{i - 1}}}\n" for i in range(1, 121)) + "hosts:\n  a: {<<: *m120}\n",
            "hosts.yaml:22: host 'a': merge keys '<<' that bring in mappings with merge keys, more than 100 deep",
        ),
        (
            "x-0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"x-{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7))
            + "hosts:\n  a: {tags: *a6}\n",
            "hosts.yaml:6: through its aliases, the value that starts here stands for more than 1,000,000 values",
        ),
        ("hosts:\n  a: &a\n    tags: [x]\n  b:\n    <<: *a\n    prot: 22\n", "hosts.yaml:6: host 'b', field 'prot': unknown field"),
        ("hosts:\n  a:\n    env:\n      A: [1]\n", "hosts.yaml:4: host 'a', field 'env': the value of 'A' must be a string"),
        ("hosts:\n  a:\n    env:\n      A: ~\n", "hosts.yaml:4: host 'a', field 'env': the value of 'A' must be a string (write '' for an empty one)"),
        ("hosts:\n  a:\n    env:\n      'A B': x\n", "hosts.yaml:4: host 'a', field 'env': invalid environment variable name 'A B'"),
        ("hosts:\n  a:\n    cwd: ''\n", "hosts.yaml:3: host 'a', field 'cwd': must not be empty"),
        # A NUL failed each task in the transport ("embedded null byte"), with a traceback.
        ("hosts:\n  a:\n    cwd: \"/tmp\\0x\"\n", "hosts.yaml:3: host 'a', field 'cwd': the value contains a NUL character"),
        ("hosts:\n  a:\n    shell: \"/bin/sh\\0\"\n", "hosts.yaml:3: host 'a', field 'shell': the value contains a NUL character"),
        (
            "hosts:\n  a:\n    transport: ssh\n    identity_files: [\"/k\\0\"]\n",
            "hosts.yaml:4: host 'a', field 'identity_files': item '/k\\x00' contains a NUL character",
        ),
        # pathlib's expansion of ~user raised a bare RuntimeError: any command, on any host, was a traceback.
        *(
            (
                f"hosts:\n  a:\n    transport: ssh\n    {field}: {value}\n",
                f"hosts.yaml:4: host 'a', field '{field}': '~{NO_SUCH_USER}/x' starts with the home directory of "
                f"user '{NO_SUCH_USER}', who does not exist on this machine",
            )
            for field, value in [
                ("identity_files", f"[~/.ssh/id, ~{NO_SUCH_USER}/x]"),
                ("known_hosts", f"~{NO_SUCH_USER}/x"),
                ("ssh_config_file", f"~{NO_SUCH_USER}/x"),
                ("password_file", f"~{NO_SUCH_USER}/x"),
                ("passphrase_file", f"~{NO_SUCH_USER}/x"),
            ]
        ),
        ("hosts:\n  a:\n    shell: [bash]\n", "hosts.yaml:3: host 'a', field 'shell': expected a string, got 'list'"),
        ("defaults:\n  tags: [x]\nhosts:\n  a:\n", "hosts.yaml:2: field 'tags': unknown field in 'defaults'"),
        (
            "tags:\n  web:\n    user: deploy\nhosts:\n  a:\n",
            "hosts.yaml:3: field 'user': unknown field in tag 'web' (allowed: max_concurrent, max_output_bytes, max_queued, max_seconds); "
            "to give several hosts the same other fields, write them once under x-NAME: &NAME and bring them in with <<: *NAME",
        ),
        ("defaults:\n  max_seconds: x\nhosts:\n  a:\n", "hosts.yaml:2: field 'max_seconds': expected a number, got 'x'"),
    ],
)
def test_every_error_names_file_line_host_and_field(text, expected):
    with pytest.raises(InventoryError) as info:
        parse(text)
    assert str(info.value).startswith(expected), str(info.value)
    assert info.value.path == "hosts.yaml"
    assert info.value.line == int(expected.split(":")[1])


def test_lookup_order_flag_then_env_then_config_dir_then_default(tmp_path: Path, monkeypatch):
    def hosts_file(path: Path, name: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"hosts:\n  {name}:\n")
        return path

    assert load_inventory(None, TRANSPORTS).source == DEFAULT_SOURCE
    assert list(load_inventory(None, TRANSPORTS).hosts) == ["local"]
    config = hosts_file(tmp_path / "config" / "fleetrun" / "hosts.yaml", "from-config")
    assert list(load_inventory(None, TRANSPORTS).hosts) == ["from-config"]
    env_file = hosts_file(tmp_path / "env.yaml", "from-env")
    monkeypatch.setenv("FLEETRUN_HOSTS", str(env_file))
    assert list(load_inventory(None, TRANSPORTS).hosts) == ["from-env"]
    flag_file = hosts_file(tmp_path / "flag.yaml", "from-flag")
    inventory = load_inventory(flag_file, TRANSPORTS)
    assert list(inventory.hosts) == ["from-flag"] and inventory.source == str(flag_file)
    assert config.exists()


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(InventoryError, match=r"missing\.yaml: hosts file not found \(given by --hosts\)"):
        load_inventory(tmp_path / "missing.yaml", TRANSPORTS)
    with pytest.raises(InventoryError, match=rf"^{tmp_path}: hosts file is a directory \(given by --hosts\)$"):
        load_inventory(tmp_path, TRANSPORTS)
    with pytest.raises(InventoryError, match=r"^/dev/null: hosts file is not a regular file \(given by --hosts\)$"):
        load_inventory("/dev/null", TRANSPORTS)
    monkeypatch.setenv("FLEETRUN_HOSTS", str(tmp_path / "gone.yaml"))
    with pytest.raises(InventoryError, match=r"gone\.yaml: hosts file not found \(given by FLEETRUN_HOSTS\)"):
        load_inventory(None, TRANSPORTS)


def test_a_file_that_is_not_utf8_is_an_error_naming_its_line_and_column(tmp_path):
    latin1 = tmp_path / "hosts.yaml"
    latin1.write_bytes("hosts:\n  web1:\n    description: café\n".encode("latin-1"))
    with pytest.raises(InventoryError) as error:
        load_inventory(latin1, TRANSPORTS)
    # Before: "cannot read the file: 'utf-8' codec can't decode byte 0xe9 in position 35: ...".
    assert str(error.value) == f"{latin1}:3: the file is not UTF-8: column 21 has the byte 0xE9"


def test_unknown_host_lists_the_known_ones():
    inventory = parse("hosts:\n  web1:\n  web2:\n")
    with pytest.raises(UnknownHostError, match="unknown host 'web3' \\(known hosts: web1, web2; inventory: hosts.yaml\\)"):
        inventory.get("web3")


def test_an_unknown_host_among_many_names_the_closest_instead_of_every_host():
    # Before, the one-line error listed all 300 hosts: 2.3 kB for the user or the assistant to read.
    inventory = parse("hosts:\n" + "".join(f"  web{i}:\n" for i in range(300)))
    with pytest.raises(UnknownHostError) as error:
        inventory.get("wbe12")
    assert str(error.value) == (
        "unknown host 'wbe12' (did you mean 'web12', 'web212' or 'web192'? 300 known hosts; inventory: hosts.yaml)"
    )
    with pytest.raises(UnknownHostError) as error:
        inventory.get("db1")
    assert str(error.value) == "unknown host 'db1' (300 known hosts; inventory: hosts.yaml)"
    twenty = parse("hosts:\n" + "".join(f"  h{i:02}:\n" for i in range(20)))
    with pytest.raises(UnknownHostError, match=r"\(known hosts: h00, h01, .*, h19; inventory"):
        twenty.get("h20")


def test_tags_select_hosts():
    inventory = parse("hosts:\n  a:\n    tags: [web]\n  b:\n    tags: [db]\n  c:\n    tags: [web, db]\n")
    assert [h.name for h in inventory.with_tag("web")] == ["a", "c"]
