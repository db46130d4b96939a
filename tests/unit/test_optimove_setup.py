"""Setup files (templates, promotions): parsing, validation with line numbers, batching, sending."""
from __future__ import annotations

import json

import pytest

from shared.optimove.client import PermanentError, RateLimited, Throttled
from shared.optimove.limiter import LocalRateLimiter, RateLimiter, limiter_from_settings
from shared.optimove.setup import (PROMOTIONS, TEMPLATES, Problem, RecordFileError, SyncFailed, batches,
                                   call_path, call_with_retry, detect_format, list_records, load_records,
                                   parse_records, sync_records)
from shared.settings import RateLimit, Settings


def csv_problems(text: str, kind=TEMPLATES) -> list[str]:
    return [str(p) for p in parse_records(text, kind, "csv", "t.csv")[1]]


def json_problems(text: str, kind=TEMPLATES) -> list[str]:
    return [str(p) for p in parse_records(text, kind, "json", "t.json")[1]]


# --- CSV -------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["TemplateID,TemplateName", "templateid,TEMPLATENAME", "template_id,template_name",
                                    "id,name", " ID , Name ", "Template ID,Template Name", "name,id,notes"])
def test_csv_header_spellings(header):
    first, second = ("Welcome", "7") if header.startswith("name") else ("7", "Welcome")
    records, problems = parse_records(f"{header}\n{first},{second}\n", TEMPLATES, "csv")
    assert problems == []
    assert [(r.id, r.name, r.line, r.item) for r in records] == [(7, "Welcome", 2, None)]


def test_csv_good_file_keeps_order_strips_and_skips_blank_lines():
    text = "\ufeffTemplateID,TemplateName\r\n\r\n 3 , Welcome back \r\n1,\"Hello, world\"\r\n,\r\n2,Bye\r\n"
    records, problems = parse_records(text, TEMPLATES, "csv")
    assert problems == []
    assert [(r.id, r.name, r.line) for r in records] == [(3, "Welcome back", 3), (1, "Hello, world", 4),
                                                        (2, "Bye", 6)]


def test_csv_each_bad_line_kind_is_named_with_its_line():
    text = ("TemplateID,TemplateName\n"    # 1
            "1,Welcome\n"                  # 2
            "abc,Bad id\n"                 # 3
            "0,Zero\n"                     # 4
            "-4,Negative\n"                # 5
            "2.5,Float\n"                  # 6
            "1,Again\n"                    # 7
            "5,   \n"                      # 8
            "6\n"                          # 9
            "7,a,b\n"                      # 10
            "99999999999,Huge\n"           # 11
            ",No id\n")                    # 12
    assert csv_problems(text) == [
        't.csv line 3: TemplateID "abc" is not an integer',
        't.csv line 4: TemplateID "0" is not a positive integer',
        't.csv line 5: TemplateID "-4" is not a positive integer',
        't.csv line 6: TemplateID "2.5" is not an integer',
        "t.csv line 7: duplicate TemplateID 1 (first on line 2)",
        "t.csv line 8: TemplateName is empty",
        "t.csv line 9: missing TemplateName (the row has 1 of the header's 2 columns)",
        "t.csv line 10: 3 values but the header has 2 columns (quote a name that contains a comma)",
        't.csv line 11: TemplateID "99999999999" is too large (at most 2147483647)',
        "t.csv line 12: TemplateID is empty",
    ]


def test_csv_line_numbers_count_multiline_quoted_names():
    text = 'TemplateID,TemplateName\n1,"two\nlines"\nx,Bad\n'
    assert csv_problems(text) == ['t.csv line 4: TemplateID "x" is not an integer']


def test_csv_bad_line_with_two_problems_reports_both():
    assert csv_problems("id,name\nx,\n") == ['t.csv line 2: TemplateID "x" is not an integer',
                                             "t.csv line 2: TemplateName is empty"]


def test_csv_missing_and_repeated_header_columns():
    missing = csv_problems("TemplateID,Title\n1,Welcome\n")
    assert len(missing) == 1 and missing[0].startswith("t.csv line 1: the header has no TemplateName column")
    assert "TemplateName, template_name or name" in missing[0]
    no_header = csv_problems("1,Welcome\n2,Bye\n")
    assert [p.split(":")[0] for p in no_header] == ["t.csv line 1", "t.csv line 1"]
    assert csv_problems("id,TemplateID,name\n1,1,x\n") == ["t.csv line 1: the header has 2 TemplateID columns: "
                                                           "id, TemplateID"]


def test_csv_empty_or_header_only():
    assert csv_problems("") == ["t.csv: no templates in the file"]
    assert csv_problems("TemplateID,TemplateName\n\n") == ["t.csv: no templates in the file"]


def test_csv_unparseable_rows_are_named_and_the_rest_still_checked():
    text = 'TemplateID,TemplateName\n1,"ok"\n2,"a"b\nx,c\n4,"unterminated\n5,x\n'
    assert csv_problems(text) == [
        "t.csv line 3: unreadable CSV: ',' expected after '\"'",
        't.csv line 4: TemplateID "x" is not an integer',
        "t.csv line 5: unreadable CSV: unexpected end of data",
    ]


# --- JSON ------------------------------------------------------------------------------------

def test_json_array_and_wrapper_object_with_line_numbers():
    array = '[\n  {"TemplateID": 4, "TemplateName": "A"},\n  {"template_id": "5", "name": " B "}\n]'
    records, problems = parse_records(array, TEMPLATES, "json")
    assert problems == [] and [(r.id, r.name, r.line, r.item) for r in records] == [(4, "A", 2, 0), (5, "B", 3, 1)]
    wrapped = '{"comment": [1, 2],\n "Templates": [\n\n   {"id": 9,\n    "name": "C"}]}'
    records, problems = parse_records(wrapped, TEMPLATES, "json")
    assert problems == [] and [(r.id, r.line, r.item) for r in records] == [(9, 4, 0)]


def test_json_each_bad_item_kind_is_named_with_line_and_index():
    text = ('{\n'                                                   # 1
            '  "templates": [\n'                                    # 2
            '    {"TemplateID": 1, "TemplateName": "A"},\n'         # 3
            '    {"TemplateID": "x", "TemplateName": "B"},\n'       # 4
            '    {"id": 1,\n'                                       # 5
            '     "name": ""},\n'                                   # 6
            '    {"TemplateName": "C"},\n'                          # 7
            '    {"TemplateID": 2},\n'                              # 8
            '    7,\n'                                              # 9
            '    {"TemplateID": true, "TemplateName": 5},\n'        # 10
            '    {"TemplateID": 3.0, "TemplateName": "D"}, {"TemplateID": -1, "TemplateName": "E"},\n'  # 11
            '    {"TemplateID": 4, "id": 4, "TemplateName": "F"}\n'  # 12
            '  ]\n'
            '}\n')
    assert json_problems(text) == [
        't.json line 4, item [1]: TemplateID "x" is not an integer',
        "t.json line 5, item [2]: TemplateName is empty",
        "t.json line 5, item [2]: duplicate TemplateID 1 (first on line 3, item [0])",
        "t.json line 7, item [3]: missing TemplateID",
        "t.json line 8, item [4]: missing TemplateName",
        "t.json line 9, item [5]: expected an object with TemplateID and TemplateName, got 7",
        "t.json line 10, item [6]: TemplateID true is not an integer",
        "t.json line 10, item [6]: TemplateName 5 is not a string",
        "t.json line 11, item [7]: TemplateID 3.0 is not an integer",
        "t.json line 11, item [8]: TemplateID -1 is not a positive integer",
        "t.json line 12, item [9]: TemplateID given 2 times: TemplateID, id",
    ]


def test_json_unparseable_and_wrong_shapes():
    assert json_problems('[{"TemplateID": 1,\n "TemplateName": "A"},\n {"TemplateID" 2}]') == [
        "t.json line 3: not valid JSON: Expecting ':' delimiter (column 16)"]
    assert json_problems('{"items": []}')[0].startswith("t.json line 1: expected a JSON array of templates or")
    assert json_problems('"templates"')[0].startswith("t.json line 1: expected")
    assert json_problems("[]") == ["t.json: no templates in the file"]


def test_json_positions_survive_strings_with_brackets_and_escapes():
    text = '[{"TemplateName": "a ] , } [ \\" x", "TemplateID": 1},\n{"TemplateID": 1, "TemplateName": "b"}]'
    assert json_problems(text) == ["t.json line 2, item [1]: duplicate TemplateID 1 (first on line 1, item [0])"]


# --- promotions: string ids ------------------------------------------------------------------

def test_promotions_kind_uses_string_ids():
    records, problems = parse_records("PromoCode,PromotionName\nWB23,Welcome back\n 10 ,Ten\n", PROMOTIONS, "csv")
    assert problems == [] and [(r.id, r.name) for r in records] == [("WB23", "Welcome back"), ("10", "Ten")]
    assert PROMOTIONS.to_api(records[0]) == {"PromoCode": "WB23", "PromotionName": "Welcome back"}
    text = '{"promotions": [{"code": "A", "name": "x"}, {"promo_code": "A", "promotion_name": "y"}, ' \
           '{"PromoCode": " ", "PromotionName": "z"}, {"PromoCode": 12, "PromotionName": "n"}]}'
    assert json_problems(text, PROMOTIONS) == [
        "t.json line 1, item [1]: duplicate PromoCode \"A\" (first on line 1, item [0])",
        "t.json line 1, item [2]: PromoCode is empty"]


# --- files -----------------------------------------------------------------------------------

def test_load_records_from_files_and_unreadable_files(tmp_path):
    (tmp_path / "t.csv").write_text("id,name\n1,A\n")
    (tmp_path / "t.json").write_text('[{"id": 1, "name": "A"}]')
    (tmp_path / "t.txt").write_text('  [{"id": 2, "name": "B"}]')
    assert [r.id for r in load_records(tmp_path / "t.csv", TEMPLATES)] == [1]
    assert [r.id for r in load_records(tmp_path / "t.json", TEMPLATES)] == [1]
    assert [r.id for r in load_records(tmp_path / "t.txt", TEMPLATES)] == [2]
    with pytest.raises(RecordFileError) as missing:
        load_records(tmp_path / "nope.csv", TEMPLATES)
    assert str(missing.value) == f"{tmp_path / 'nope.csv'}: no such file"
    (tmp_path / "latin.csv").write_bytes(b"id,name\n1,Caf\xe9\n")
    with pytest.raises(RecordFileError) as latin:
        load_records(tmp_path / "latin.csv", TEMPLATES)
    assert "not UTF-8" in str(latin.value)
    assert detect_format("x.CSV", "[") == "csv" and detect_format("x", "{") == "json"


def test_problem_text():
    assert str(Problem("f.json", "bad", 3, 0)) == "f.json line 3, item [0]: bad"
    assert str(Problem("f.csv", "bad")) == "f.csv: bad"


# --- batching and sending --------------------------------------------------------------------

def records(n: int):
    text = "id,name\n" + "".join(f"{i},T{i}\n" for i in range(1, n + 1))
    return parse_records(text, TEMPLATES, "csv")[0]


def test_batches_of_at_most_100():
    assert [len(b) for b in batches(records(250))] == [100, 100, 50]
    assert [len(b) for b in batches(records(100))] == [100]
    assert batches([]) == []
    with pytest.raises(ValueError):
        batches(records(3), 101)
    assert call_path(TEMPLATES, {"ChannelID": 504}) == "POST /integrations/AddChannelTemplates?ChannelID=504"
    assert call_path(PROMOTIONS, {}, add=False) == "GET /integrations/GetPromotions"


class FakeClient:
    """Answers each call from a script: None (success) or an exception to raise."""

    def __init__(self, script=()):
        self.script = list(script)
        self.calls = []

    def _next(self, call):
        self.calls.append(call)
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def post(self, category, function, body, params=None):
        return self._next(("POST", category, function, body, params))

    def get(self, category, function, params=None):
        return self._next(("GET", category, function, None, params))


def test_sync_sends_batches_in_order_with_progress():
    client, progress = FakeClient(), []
    result = sync_records(client, TEMPLATES, records(250), {"ChannelID": 504},
                          progress=lambda p: progress.append(str(p)))
    assert (result.sent, result.calls) == (250, 3)
    assert [(c[2], len(c[3]), c[4]) for c in client.calls] == [("AddChannelTemplates", 100, {"ChannelID": 504})] * 2 + [
        ("AddChannelTemplates", 50, {"ChannelID": 504})]
    assert client.calls[0][3][0] == {"TemplateID": 1, "TemplateName": "T1"}
    assert progress == ["sent 100/250 templates (call 1 of 3)", "sent 200/250 templates (call 2 of 3)",
                        "sent 250/250 templates (call 3 of 3)"]


def test_sync_stops_at_a_rejected_call_saying_how_many_were_sent():
    client = FakeClient([None, PermanentError('POST AddChannelTemplates: HTTP 400: "bad"', 400)])
    with pytest.raises(SyncFailed) as failed:
        sync_records(client, TEMPLATES, records(250), {"ChannelID": 504}, sleep=lambda s: None)
    assert len(client.calls) == 2 and failed.value.sent == 100 and failed.value.call == 2
    text = str(failed.value)
    assert text.startswith('AddChannelTemplates call 2 of 3 failed: POST AddChannelTemplates: HTTP 400: "bad"')
    assert "100 of 250 templates were sent before it, in 1 call(s)" in text and "again is safe" in text
    first = FakeClient([PermanentError("HTTP 401", 401)])
    with pytest.raises(SyncFailed, match="None of the 250 templates were sent"):
        sync_records(first, TEMPLATES, records(250), {"ChannelID": 504})


def test_sync_wraps_other_errors_too():
    client = FakeClient([None, ConnectionError("redis down")])
    with pytest.raises(SyncFailed, match="call 2 of 2 failed: ConnectionError: redis down") as failed:
        sync_records(client, TEMPLATES, records(150))
    assert isinstance(failed.value.error, ConnectionError)


def test_retry_waits_out_rate_limit_and_retries_temporary_errors():
    sleeps = []
    client = FakeClient([RateLimited(2.5), Throttled("429", retry_after=4.0), None])
    sync_records(client, TEMPLATES, records(1), sleep=sleeps.append)
    assert len(client.calls) == 3 and sleeps[0] == 2.5 and sleeps[1] >= 4.0
    gives_up = FakeClient([Throttled("429")] * 3)
    with pytest.raises(SyncFailed, match="429"):
        sync_records(gives_up, TEMPLATES, records(1), sleep=lambda s: None, attempts=3)
    assert len(gives_up.calls) == 3
    with pytest.raises(RateLimited):
        call_with_retry(lambda: (_ for _ in ()).throw(RateLimited(40.0)), max_wait=60.0, sleep=lambda s: None)


def test_list_records():
    rows = [{"TemplateID": 1, "TemplateName": "A"}]
    client = FakeClient([rows])
    assert list_records(client, TEMPLATES, {"ChannelID": 504}) == rows
    assert client.calls == [("GET", "integrations", "GetChannelTemplates", None, {"ChannelID": 504})]
    assert list_records(FakeClient([None]), TEMPLATES) == []
    with pytest.raises(PermanentError):
        list_records(FakeClient([{"not": "a list"}]), TEMPLATES)
    assert TEMPLATES.fields_of({"templateId": 3, "templatename": "x"}) == (3, "x")
    assert TEMPLATES.fields_of({"other": 1}) == (None, None)


# --- in-process rate limiter -----------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_local_limiter_sliding_window():
    clock = Clock()
    limiter = LocalRateLimiter(RateLimit(2, 10.0), margin=0.0, clock=clock)
    assert [limiter.try_acquire() for _ in range(2)] == [0.0, 0.0]
    clock.now += 4
    assert limiter.try_acquire() == pytest.approx(6.0)
    clock.now += 6
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == 0.0 and limiter.try_acquire() > 0


def test_local_limiter_acquire_sleeps_until_deadline():
    clock = Clock()

    def sleep(seconds):
        clock.now += seconds

    limiter = LocalRateLimiter(RateLimit(1, 5.0), sleep=sleep, clock=clock)
    assert limiter.margin == pytest.approx(0.1)
    assert limiter.acquire(1) and limiter.acquire(10) and clock.now == pytest.approx(105.1)
    assert limiter.acquire(1) is False


def test_limiter_from_settings_picks_redis_only_with_redis_url():
    base = {"OPTIMOVE_API_URL": "http://x", "OPTIMOVE_API_KEY": "key-123", "OPTIMOVE_RATE_LIMIT": "5/1s"}
    local = limiter_from_settings(Settings.from_env(base))
    assert isinstance(local, LocalRateLimiter) and local.limit == RateLimit(5, 1.0)
    shared = limiter_from_settings(Settings.from_env({**base, "REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert isinstance(shared, RateLimiter) and "key-123" not in shared.key and "key-123" not in repr(shared)


def test_to_api_body_is_plain_json():
    body = [TEMPLATES.to_api(r) for r in records(2)]
    assert json.loads(json.dumps(body)) == [{"TemplateID": 1, "TemplateName": "T1"},
                                            {"TemplateID": 2, "TemplateName": "T2"}]
