"""Identifiers as SQL writes them: quoted mixed-case names, spaces and reserved words.

Schemas that ORMs create (Prisma's and Entity Framework's "Items") must replicate
through every command, and every message must print a name as SQL would.  The
branch logs in as its own HQ role, so the row restriction of a filtered catalog
(rendered at install with these names) is exercised too.
"""
from __future__ import annotations

import json

import yaml

from harness import replicator_cli, table_rows
from replicator.hq import add_branch

SCHEMA = """
CREATE TABLE "Items" ("Id" int PRIMARY KEY, "Name" text NOT NULL, "order" int, "user" text, "Store Id" int);
CREATE TABLE "order" (id int PRIMARY KEY, "user" text, "select" numeric(8,2));
"""
CATALOGS = {
    "items": {"label": "Items", "default": True, "tables": ['public."Items"'],
              "filter": '"Store Id" = :store_id', "exclude_columns": {'public."Items"': ['"user"']}},
    "orders": {"label": "Orders", "default": True, "tables": ['"order"']},
}
PASSWORD = "ident-pw-5521"


def _write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_quoted_mixed_case_and_reserved_names_replicate_through_every_command(tmp_path, hq, branch_a):
    hq.execute(SCHEMA)
    branch_a.execute('CREATE TABLE "order" (id int PRIMARY KEY, "user" text, "select" numeric(8,2))')
    hq_yaml = _write(tmp_path / "hq.yaml", {"dsn": hq.dsn, "catalogs": CATALOGS})
    r = replicator_cli("hq", "install", "-c", hq_yaml)
    assert r.returncode == 0, r.stderr
    assert 'capture attached: public."Items"' in r.stdout and 'capture attached: public."order"' in r.stdout, r.stdout
    assert 'row restriction for branch logins rebuilt: public."Items"' in r.stdout, r.stdout
    hq.execute("""INSERT INTO "Items" VALUES (1, 'uno', 1, 'secret-user', 7), (2, 'dos', 2, 'x', 8),
                                             (3, 'tres', 3, 'y', 7)""")
    hq.execute("""INSERT INTO "order" VALUES (1, 'ana', 1.50), (2, 'bo', 2.25)""")
    from replicator import config
    with hq.connect() as conn:
        reg = add_branch(conn, config.load_hq(hq_yaml), "ident-7", {"store_id": "7"}, PASSWORD)
    branch_yaml = _write(tmp_path / "b.yaml", {"branch": "ident-7",
                                               "source": {"dsn": hq.cluster.dsn(hq.name, reg.role, PASSWORD)},
                                               "target": {"dsn": branch_a.dsn}})

    def cli(*args, code=0):
        r = replicator_cli(*args, "-c", branch_yaml)
        assert r.returncode == code, r.stdout + r.stderr
        return r

    r = cli("init", code=1)                                  # "Items" is missing on the branch
    assert 'public."Items"' in r.stderr and "--create-missing" in r.stderr, r.stderr
    cli("init", "--create-missing")
    assert table_rows(branch_a, '"Items"', '"Id", "Name", "order", "user", "Store Id"') == [
        "(1,uno,1,,7)", "(3,tres,3,,7)"]                   # store 7 only, "user" never left HQ
    assert table_rows(branch_a, '"order"') == ["(1,ana,1.50)", "(2,bo,2.25)"]

    hq.execute("""UPDATE "Items" SET "Name" = 'UNO', "order" = 10 WHERE "Id" = 1""")
    hq.execute("""UPDATE "Items" SET "Store Id" = 7 WHERE "Id" = 2""")          # moves into store 7
    hq.execute("""UPDATE "Items" SET "Store Id" = 8 WHERE "Id" = 3""")          # moves out
    hq.execute("""UPDATE "order" SET "select" = 9.99 WHERE id = 2""")
    hq.execute("""DELETE FROM "order" WHERE id = 1""")
    cli("run", "--once")
    assert table_rows(branch_a, '"Items"', '"Id", "Name", "order", "Store Id"') == ["(1,UNO,10,7)", "(2,dos,2,7)"]
    assert table_rows(branch_a, '"order"') == ["(2,bo,9.99)"]

    r = cli("status")
    assert "catalogs are up to date" in r.stdout, r.stdout
    cli("verify")
    with branch_a.connect() as conn:                                 # behind replication's back
        conn.execute("SET session_replication_role = replica")
        conn.execute("""UPDATE "order" SET "user" = 'changed' WHERE id = 2""")
    r = cli("verify", "--json", code=1)
    report = json.loads(r.stdout)
    assert [t["table"] for t in report["tables"] if t["status"] == "different"] == ['public."order"'], report
    cli("verify", "--repair")
    assert table_rows(branch_a, '"order"') == ["(2,bo,9.99)"]


def test_an_unquoted_mixed_case_name_means_what_sql_means_and_the_error_says_how_to_write_it(tmp_path, hq):
    hq.execute(SCHEMA)
    doc = {"dsn": hq.dsn, "catalogs": {"items": {"label": "Items", "tables": ["public.Items"]}}}
    r = replicator_cli("hq", "install", "-c", _write(tmp_path / "hq.yaml", doc))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert ('catalog items: table public.items does not exist on HQ; there is public."Items": write it so in '
            'hq.yaml (quoted as in SQL)') in r.stderr, r.stderr
    doc["catalogs"]["items"]["exclude_columns"] = {'public."Items"': ["Name"]}   # means name
    doc["catalogs"]["items"]["tables"] = ['public."Items"']
    r = replicator_cli("hq", "install", "-c", _write(tmp_path / "hq2.yaml", doc))
    assert r.returncode == 2 and 'exclude_columns: public."Items" has no column name' in r.stderr, r.stderr
    doc["catalogs"]["items"]["exclude_columns"] = {'public."Items"': ['"Name"', "user"]}
    r = replicator_cli("hq", "install", "-c", _write(tmp_path / "hq3.yaml", doc))
    assert r.returncode == 0, r.stderr
    assert hq.scalar("SELECT exclude_columns FROM replication.tables") == ["Name", "user"]
