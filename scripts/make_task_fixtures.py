#!/usr/bin/env python3
"""Writes the project's own small FewCLUE-format fixtures (our text, not
FewCLUE's): short product reviews composed from phrase lists, in the
original EPRSTMT JSON-lines layout ({"id", "sentence", "label"}), and a few
BUSTM-style sentence pairs. Deterministic; outputs are committed.

    python3 scripts/make_task_fixtures.py [OUT_DIR]   # default worker/tests/fixtures/fewclue
"""
import json
import os
import random
import sys

ITEMS = ["耳机", "手机", "衣服", "鞋子", "书包", "台灯", "水杯", "键盘", "外套", "面膜", "茶叶", "雨伞"]
GOOD = ["质量很好", "非常好用", "做工很好", "物流很快，东西很好", "很满意，好评", "性价比很高，很好", "颜色很好看", "包装很好，推荐"]
BAD = ["质量很差", "非常难用", "做工太差", "物流太慢，东西很差", "很失望，差评", "一点也不值，很差", "颜色很难看", "包装破了，很差"]
OPEN = ["这个", "买的", "收到的", "新买的", ""]


def reviews(rng, n, start_id):
    out = []
    for i in range(n):
        label = "Positive" if i % 2 == 0 else "Negative"
        phrase = rng.choice(GOOD if label == "Positive" else BAD)
        out.append({"id": start_id + i, "sentence": f"{rng.choice(OPEN)}{rng.choice(ITEMS)}{phrase}。", "label": label})
    return out


PAIRS = [("今天天气怎么样", "今天的天气如何", "1"), ("我想买一部手机", "我打算买个新手机", "1"),
         ("这家店几点关门", "这家店什么时候关门", "1"), ("你喜欢吃苹果吗", "明天会下雨吗", "0"),
         ("怎么去火车站", "火车站怎么走", "1"), ("这本书好看吗", "我的电脑坏了", "0"),
         ("帮我订一张机票", "请帮我买张飞机票", "1"), ("晚饭吃什么", "这件衣服多少钱", "0")]


# Paraphrase pairs by topic, for the larger BUSTM-style test set: a topic's
# two phrasings are similar (1), phrasings of two topics are not (0).
TOPICS = [("今天天气怎么样", "今天的天气如何"), ("我想买一部手机", "我打算买个新手机"), ("这家店几点关门", "这家店什么时候关门"),
          ("怎么去火车站", "火车站怎么走"), ("帮我订一张机票", "请帮我买张飞机票"), ("晚饭吃什么", "今晚吃点什么"),
          ("这件衣服多少钱", "这件衣服卖多少钱"), ("明天会下雨吗", "明天有雨吗"), ("你喜欢吃苹果吗", "你爱吃苹果吗"),
          ("这本书好看吗", "这本书值得读吗"), ("我的电脑坏了", "我的电脑出故障了"), ("附近有医院吗", "这附近有没有医院"),
          ("周末去爬山吧", "周末一起去爬山"), ("会议几点开始", "会议什么时候开始"), ("快递到了没有", "快递送到了吗"),
          ("这道题怎么做", "这道题该怎么解")]


def paraphrase_pairs(rng, n):
    out = []
    for i in range(n):
        t = i // 2 % len(TOPICS)
        a, b = TOPICS[t] if i // (2 * len(TOPICS)) == 0 else TOPICS[t][::-1]
        if i % 2 == 0:
            out.append((a, b, "1"))
        else:
            other = TOPICS[(t + rng.randrange(1, len(TOPICS))) % len(TOPICS)]
            out.append((a, rng.choice(other), "0"))
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "worker/tests/fixtures/fewclue"
    rng = random.Random(7)
    os.makedirs(f"{out}/eprstmt", exist_ok=True)
    os.makedirs(f"{out}/bustm", exist_ok=True)
    for name, n, start in [("train", 64, 0), ("dev", 32, 1000)]:
        with open(f"{out}/eprstmt/{name}.json", "w", encoding="utf-8") as f:
            for r in reviews(rng, n, start):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(f"{out}/bustm/dev.json", "w", encoding="utf-8") as f:
        for i, (a, b, l) in enumerate(PAIRS):
            f.write(json.dumps({"id": i, "sentence1": a, "sentence2": b, "label": l}, ensure_ascii=False) + "\n")
    # Larger test sets (the demo's eval), from a stream of their own so the
    # files above stay as they were: one example is under a point of them.
    rng = random.Random(11)
    with open(f"{out}/eprstmt/test.json", "w", encoding="utf-8") as f:
        for r in reviews(rng, 160, 2000):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(f"{out}/bustm/test.json", "w", encoding="utf-8") as f:
        for i, (a, b, l) in enumerate(paraphrase_pairs(rng, 64)):
            f.write(json.dumps({"id": 100 + i, "sentence1": a, "sentence2": b, "label": l}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
