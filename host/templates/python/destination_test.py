"""Run from this folder: python -m unittest -v"""

import json
import unittest

import logic


class Logic(unittest.TestCase):
    def test_the_request_carries_the_deal_and_the_idempotency_key(self):
        fields = {"event_type": "deal_updated", "reference": "D-1", "status": "Won", "deal_name": None,
                  "deal_value": 10.0, "email": "a@example.com"}
        url, headers, body = logic.request_for(fields, "notify", "key-1", "https://x.example/hook", "t0ken")
        self.assertEqual(url, "https://x.example/hook")
        self.assertIn(("idempotency-key", "key-1"), headers)
        self.assertIn(("authorization", "Bearer t0ken"), headers)
        self.assertEqual(json.loads(body)["deal"]["id"], "D-1")

    def test_answers_are_classified_by_status(self):
        self.assertEqual(logic.outcome_for(201, b"ok"), ("delivered", "ok"))
        self.assertEqual(logic.outcome_for(503, b"")[0], "retryable")
        self.assertEqual(logic.outcome_for(400, b"bad"), ("permanent", "bad"))


if __name__ == "__main__":
    unittest.main()
