from tests.openbao import DevServer


def test_dev_server_answers_kv_reads(bao: DevServer) -> None:
    version = bao.kv_put("fixture/check", {"k": "v"})
    reply = bao.api("GET", "secret/data/fixture/check")
    assert reply["data"]["data"] == {"k": "v"}
    assert reply["data"]["metadata"]["version"] == version
