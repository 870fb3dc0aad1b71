"""nsfw.resolver.dnsmsg: strict parsing of queries and responses, and the replies built from them."""

from __future__ import annotations

import random
import struct

import pytest

from nsfw import world
from nsfw.resolver import dnsmsg
from nsfw.resolver.dnsmsg import DnsFormatError

ZONE = world.ZoneView(world.normalize_zone(world.DEFAULT_ZONE))
OPT = b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)


def name(text: str) -> bytes:
    return world.encode_name(text)


def query(qname: str | bytes, qtype: int = 1, *, qid: int = 0x1234, flags: int = 0x0100, edns: bool = False,
          qclass: int = 1) -> bytes:
    wire = qname if isinstance(qname, bytes) else name(qname)
    header = struct.pack("!6H", qid, flags, 1, 0, 0, 1 if edns else 0)
    return header + wire + struct.pack("!HH", qtype, qclass) + (OPT if edns else b"")


def upstream_answer(qname: str, qtype: int = 1, *, qid: int = 0x4242) -> bytes:
    """What the world's authoritative server answers to the query we would send upstream."""
    wire = dnsmsg.parse_query(query(qname, qtype)).wire
    reply = world.dns_reply(dnsmsg.make_query(qid, wire), ZONE, udp=False)
    assert reply is not None
    return reply


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def response(question: bytes, answers: list[bytes], *, qid: int = 1, flags: int = 0x8180, ns: int = 0) -> bytes:
    header = struct.pack("!6H", qid, flags, 1, len(answers) - ns, ns, 0)
    return header + question + struct.pack("!HH", 1, 1) + b"".join(answers)


# ---------------------------------------------------------------------------------------------- queries


def test_query_fields_lower_case_name_and_question_echo() -> None:
    q = dnsmsg.parse_query(query("WWW.Example.ORG", 65, qid=77))
    assert (q.id, q.name, q.qtype, q.qclass, q.edns) == (77, "www.example.org", 65, 1, None)
    assert q.question == name("WWW.Example.ORG") + struct.pack("!HH", 65, 1)  # as asked, for the echo
    # only the name is lower-cased: type 65 is b"\x00A", which must stay an A
    assert q.wire == name("www.example.org") + struct.pack("!HH", 65, 1)


def test_query_edns_size_and_root() -> None:
    assert dnsmsg.parse_query(query("example.org", edns=True)).edns == 4096
    small = struct.pack("!6H", 1, 0, 1, 0, 0, 1) + name("a.org") + struct.pack("!HH", 1, 1)
    small += b"\0" + struct.pack("!HHIH", 41, 100, 0, 0)
    assert dnsmsg.parse_query(small).edns == 512  # below 512 means 512 (RFC 6891)
    assert dnsmsg.parse_query(query(b"\0", 2)).name == "."


def test_labels_with_dots_or_odd_bytes_are_escaped() -> None:
    # one label "allowed.test" under "evil": it must never read as the name allowed.test.evil
    q = dnsmsg.parse_query(query(b"\x0callowed.test\x04evil\0"))
    assert q.name == "allowed\\046test.evil"
    q = dnsmsg.parse_query(query(b"\x03A\xffb\x02_x\x01*\0"))
    assert q.name == "a\\255b._x.*"


@pytest.mark.parametrize("packet", [
    b"",
    b"\x12\x34\x01\x00\x00\x01",  # shorter than a header
    query("example.org", flags=0x8100),  # a response: answering it could loop two servers
])
def test_unusable_header_means_silence(packet: bytes) -> None:
    with pytest.raises(DnsFormatError) as e:
        dnsmsg.parse_query(packet)
    assert e.value.qid is None and e.value.reply() is None


@pytest.mark.parametrize("packet, rcode", [
    (struct.pack("!6H", 9, 0x0100, 0, 0, 0, 0), dnsmsg.FORMERR),  # no question
    (struct.pack("!6H", 9, 0x0100, 2, 0, 0, 0) + name("a.org") + b"\0\1\0\1" * 2, dnsmsg.FORMERR),
    (query("example.org", qid=9, flags=0x2100), dnsmsg.NOTIMP),  # opcode UPDATE
    (query(b"\xc0\x0c", qid=9), dnsmsg.FORMERR),  # a pointer in the question
    (query(b"\x40" + b"a" * 64 + b"\0", qid=9), dnsmsg.FORMERR),  # label of 64
    (query(b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\0", qid=9),
     dnsmsg.FORMERR),  # 257 octets
    (query("example.org", qid=9)[:-3], dnsmsg.FORMERR),  # truncated question
    (query("example.org", qid=9) + b"junk", dnsmsg.FORMERR),  # trailing garbage
    (query("example.org", qid=9, edns=True)[:-4], dnsmsg.FORMERR),  # truncated OPT
    (query("example.org", qid=9, edns=True) + OPT, dnsmsg.FORMERR),  # count says 1, two follow
    (struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0xFFFF) + name("a.org") + b"\0\1\0\1" + OPT, dnsmsg.FORMERR),
    (struct.pack("!6H", 9, 0x0100, 1, 0, 0, 9) + name("a.org") + b"\0\1\0\1" + OPT * 9, dnsmsg.FORMERR),
])
def test_bad_question_with_usable_header_gets_an_error_answer(packet: bytes, rcode: int) -> None:
    with pytest.raises(DnsFormatError) as e:
        dnsmsg.parse_query(packet)
    reply = e.value.reply()
    assert reply is not None
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", reply)
    assert qid == 9 and flags & 0x8000 and flags & 0xF == rcode and (qd, an, ns, ar) == (0, 0, 0, 0)


def test_two_opt_records_are_formerr() -> None:
    packet = struct.pack("!6H", 5, 0x0100, 1, 0, 0, 2) + name("a.org") + b"\0\1\0\1" + OPT + OPT
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_query(packet)


# ---------------------------------------------------------------------------------------------- responses


def test_response_cname_chain_records_and_ttls() -> None:
    resp = dnsmsg.parse_response(upstream_answer("chain.test", 28))
    assert (resp.id, resp.rcode, resp.truncated, resp.name, resp.qtype) == (0x4242, 0, False, "chain.test", 28)
    assert [(r.owner, r.rtype, r.ttl, r.data) for r in resp.answers] == [
        ("chain.test", 5, 30, "c1.chain.test"),
        ("c1.chain.test", 5, 30, "c2.chain.test"),
        ("c2.chain.test", 28, 30, "2001:db8::20"),
    ]
    chain, addresses = dnsmsg.follow_chain(resp.name, resp.answers)
    assert chain == ("chain.test", "c1.chain.test", "c2.chain.test")
    assert [a.data for a in addresses] == ["2001:db8::20"]
    assert resp.negative_ttl is None


def test_negative_response_ttl_from_soa() -> None:
    resp = dnsmsg.parse_response(upstream_answer("nothing.test"))
    assert resp.rcode == dnsmsg.NXDOMAIN and resp.answers == ()
    assert resp.negative_ttl == world.NEGATIVE_TTL
    nodata = dnsmsg.parse_response(upstream_answer("cdn.test", 28))
    assert nodata.rcode == 0 and nodata.answers == () and nodata.negative_ttl == world.NEGATIVE_TTL


def test_follow_chain_ignores_strangers_and_loops() -> None:
    rec = dnsmsg.Record
    answers = (rec("a.test", 5, 1, 30, "b.test"), rec("b.test", 5, 1, 30, "a.test"),
               rec("b.test", 1, 1, 30, "192.0.2.1"), rec("evil.test", 1, 1, 30, "192.0.2.66"))
    chain, addresses = dnsmsg.follow_chain("a.test", answers)
    assert chain == ("a.test", "b.test")
    assert [a.data for a in addresses] == ["192.0.2.1"]


def test_compression_is_decoded() -> None:
    q = name("example.org")
    msg = response(q, [rr(b"\x03www\xc0\x0c", 5, 60, b"\xc0\x0c"), rr(b"\xc0\x0c", 1, 60, bytes([192, 0, 2, 1]))])
    resp = dnsmsg.parse_response(msg)
    assert [(r.owner, r.data) for r in resp.answers] == [("www.example.org", "example.org"),
                                                         ("example.org", "192.0.2.1")]


@pytest.mark.parametrize("owner", [
    b"\xc0\x1d",  # points at itself (the answer's owner starts at offset 29)
    b"\xc0\x1f",  # points forwards
    b"\xc0\x02",  # points into the header
    b"\x01a\xc0\x1d",  # a label, then back to itself: a loop
    b"\x80a",  # reserved label type
    b"\x41" + b"a" * 65,  # label of 65
])
def test_bad_names_in_records_raise(owner: bytes) -> None:
    q = name("example.org")  # 13 octets: question at 12..28, the answer's owner at 29
    msg = response(q, [rr(owner, 1, 60, bytes(4))])
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_response(msg)


def test_mutual_pointers_raise() -> None:
    # two names pointing at each other: the second points back (allowed), the first points forwards (never)
    q = name("example.org")
    a_at = 12 + len(q) + 4
    body = rr(bytes([0xC0, a_at + 16]), 1, 60, bytes(4)) + rr(bytes([0xC0, a_at]), 1, 60, bytes(4))
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_response(response(q, []) + body)


def test_pointer_chains_are_bounded() -> None:
    # a 64 KB response whose every owner points at the previous owner, itself a pointer: without a bound on
    # pointers per name, walking it would take quadratic time
    q = name("a.test")
    first = 12 + len(q) + 4
    records = [rr(b"\xc0\x0c", 1, 60, bytes(4))]
    at = first
    while at < 60000:
        records.append(rr(bytes([0xC0 | at >> 8, at & 0xFF]), 1, 60, bytes(4)))
        at += len(records[-1])
    msg = struct.pack("!6H", 1, 0x8180, 1, len(records), 0, 0) + q + b"\0\1\0\1" + b"".join(records)
    with pytest.raises(DnsFormatError, match="too many compression pointers"):
        dnsmsg.parse_response(msg)
    shallow = struct.pack("!6H", 1, 0x8180, 1, 20, 0, 0) + q + b"\0\1\0\1" + b"".join(records[:20])
    assert len(dnsmsg.parse_response(shallow).answers) == 20


def test_name_longer_than_255_through_compression_raises() -> None:
    q = name("example.org")
    long1 = b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\xc0\x0c"  # 192 + 13 octets: ok
    first = rr(long1, 5, 60, b"\xc0\x0c")
    at = 12 + len(q) + 4
    second = rr(b"\x3f" + b"d" * 63 + bytes([0xC0, at]), 1, 60, bytes(4))  # 64 + 205 octets: too long
    dnsmsg.parse_response(response(q, [first]))
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_response(response(q, [first, second]))


@pytest.mark.parametrize("mangle", [
    lambda m: m[:-1],  # truncated record data
    lambda m: m[:-12],  # truncated record header
    lambda m: m + b"\0",  # trailing garbage
    lambda m: m[:6] + b"\xff\xff" + m[8:],  # 65535 answers in a small packet
    lambda m: m[:4] + b"\x00\x00" + m[6:],  # no question
    lambda m: m[:2] + b"\x01\x00" + m[4:],  # not a response
    lambda m: m[:10],  # shorter than a header
])
def test_broken_responses_raise(mangle: object) -> None:
    msg = upstream_answer("multi.test")
    dnsmsg.parse_response(msg)
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_response(mangle(msg))  # type: ignore[operator]


@pytest.mark.parametrize("rtype, rdata", [(1, bytes(5)), (28, bytes(4)), (5, b"\x01a\0junk")])
def test_bad_rdata_raises(rtype: int, rdata: bytes) -> None:
    with pytest.raises(DnsFormatError):
        dnsmsg.parse_response(response(name("a.test"), [rr(b"\xc0\x0c", rtype, 60, rdata)]))


def test_ttl_with_top_bit_is_zero() -> None:
    resp = dnsmsg.parse_response(response(name("a.test"), [rr(b"\xc0\x0c", 1, 0x80000001, bytes(4))]))
    assert resp.answers[0].ttl == 0


# ---------------------------------------------------------------------------------------------- replies


def _ttls(msg: bytes) -> list[int]:
    return [r.ttl for r in dnsmsg.parse_response(msg).answers]


def test_rewrite_sets_id_question_case_and_ages_ttls() -> None:
    resp = dnsmsg.parse_response(upstream_answer("www.cname.test"))
    q = dnsmsg.parse_query(query("WWW.Cname.TEST", qid=0xBEEF, flags=0x0100))
    out = dnsmsg.rewrite(resp, q, 7, 86400, 512)
    qid, flags = struct.unpack("!HH", out[:4])
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0x0100 and flags & 0x0080 and not flags & 0x0400
    assert out[12:12 + len(q.question)] == q.question  # the client's own letter case
    assert _ttls(out) == [23, 23]
    assert _ttls(dnsmsg.rewrite(resp, q, 100, 86400, 512)) == [0, 0]
    assert _ttls(dnsmsg.rewrite(resp, q, 0, 10, 512)) == [10, 10]  # capped
    assert [r.data for r in dnsmsg.parse_response(out).answers] == ["other.test", "198.51.100.20"]


def test_rewrite_edns_only_for_edns_clients() -> None:
    resp = dnsmsg.parse_response(upstream_answer("allowed.test"))
    plain = dnsmsg.rewrite(resp, dnsmsg.parse_query(query("allowed.test")), 0, 86400, 512)
    edns = dnsmsg.rewrite(resp, dnsmsg.parse_query(query("allowed.test", edns=True)), 0, 86400, 1232)
    assert struct.unpack("!H", plain[10:12])[0] == 0 and b"\0\0\x29" not in plain[-11:]
    assert struct.unpack("!H", edns[10:12])[0] == 1 and edns.endswith(b"\0\0\x29\x04\xd0" + bytes(6))


def test_rewrite_over_the_limit_is_truncated() -> None:
    big = world.ZoneView(world.normalize_zone({"big.test": {"A": [f"192.0.2.{i}" for i in range(1, 60)]}}))
    wire = dnsmsg.parse_query(query("big.test")).wire
    reply = world.dns_reply(dnsmsg.make_query(1, wire), big, udp=False)
    assert reply is not None
    resp = dnsmsg.parse_response(reply)
    q = dnsmsg.parse_query(query("big.test", qid=3))
    out = dnsmsg.rewrite(resp, q, 0, 86400, 512)
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", out[:12])
    assert qid == 3 and flags & dnsmsg.TC and (qd, an, ns, ar) == (1, 0, 0, 0)
    assert len(dnsmsg.parse_response(dnsmsg.rewrite(resp, q, 0, 86400, 65535)).answers) == 59


def test_error_and_truncated_replies_echo_the_question() -> None:
    q = dnsmsg.parse_query(query("Foo.Test", 16, qid=5, edns=True))
    for reply, rcode, tc in ((dnsmsg.error_reply(q, dnsmsg.NXDOMAIN), 3, 0), (dnsmsg.error_reply(q, 2), 2, 0),
                             (dnsmsg.truncated_reply(q), 0, dnsmsg.TC)):
        resp = dnsmsg.parse_response(reply)
        assert (resp.id, resp.rcode, resp.flags & dnsmsg.TC, resp.name, resp.qtype) == (5, rcode, tc, "foo.test", 16)
        assert reply[12:12 + len(q.question)] == q.question and resp.counts == (0, 0, 0)


def test_make_query_round_trips() -> None:
    wire = dnsmsg.parse_query(query("a.test", 28)).wire
    q = dnsmsg.parse_query(dnsmsg.make_query(99, wire))
    assert (q.id, q.name, q.qtype, q.edns, q.flags) == (99, "a.test", 28, dnsmsg.EDNS_SIZE, dnsmsg.RD)


def test_names_of_types_and_rcodes() -> None:
    assert (dnsmsg.type_name(65), dnsmsg.type_name(999), dnsmsg.rcode_name(3), dnsmsg.rcode_name(11)) == (
        "HTTPS", "TYPE999", "NXDOMAIN", "RCODE11")


# ---------------------------------------------------------------------------------------------- fuzzing


def _mutations(seed: bytes, rng: random.Random) -> bytes:
    msg = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(msg) + 1)
        if kind == 0 and msg:
            msg[min(pos, len(msg) - 1)] = rng.randrange(256)
        elif kind == 1:
            del msg[pos:]
        elif kind == 2:
            msg[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3 and msg:
            msg[min(pos, len(msg) - 1)] = rng.choice((0xC0, 0x3F, 0x40, 0xFF, 0x00))
        elif kind == 4 and len(msg) > 12:
            msg[rng.randrange(4, 12)] = rng.choice((0, 1, 2, 0xFF))  # counts
        elif kind == 5 and msg:
            start = rng.randrange(len(msg))
            msg[pos:pos] = msg[start:start + rng.randint(1, 20)]
    return bytes(msg)


def test_fuzzed_messages_raise_only_dns_format_error() -> None:
    rng = random.Random(20240229)
    queries = [query("allowed.test"), query("www.Example.org", 65, edns=True), query(b"\0", 2)]
    responses = [upstream_answer(n, t) for n, t in (("chain.test", 1), ("multi.test", 1), ("nope.test", 1),
                                                    ("v6only.test", 28), ("www.cname.test", 255))]
    parsed = failed = 0
    for i in range(30000):
        seed = queries[i % 3] if i % 2 else responses[i % 5]
        msg = _mutations(seed, rng)
        for parse in (dnsmsg.parse_query, dnsmsg.parse_response):
            try:
                result = parse(msg)
            except DnsFormatError as e:
                failed += 1
                reply = e.reply()
                assert reply is None or len(reply) == 12
            else:
                parsed += 1
                if isinstance(result, dnsmsg.Query):
                    assert len(dnsmsg.error_reply(result, 2)) >= 12
                else:
                    dnsmsg.follow_chain(result.name, result.answers)
    assert parsed and failed  # both paths were exercised
