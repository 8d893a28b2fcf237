"""Chinese quality filters keep good Chinese text and still remove Chinese web junk.

Good text: whole-sentence passages (>= 200 characters) of the shared classic novels and classical prose, and
whole poems of chinese-poetry (any length), built by benchmarks/filter_rates.py; each set must pass at >= 98%.
Junk: realistic Chinese web pages, each removed by the filter that exists for it, through the library call
and through `jaxllm data clean`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from jaxllm.cli import main as cli_main
from jaxllm.data.filters import FILTERS, FilterConfig, detect_language, first_failure, is_verse, units

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"   # as in conftest.py


def _filter_rates():
    spec = importlib.util.spec_from_file_location("filter_rates", ROOT / "benchmarks" / "filter_rates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Web junk, each with the filter meant to catch it.
JUNK = {
    "navigation": ("boilerplate",
                   "首页 | 关于我们 | 产品中心 | 新闻动态 | 联系我们\n登录 | 注册 | 购物车\n"
                   "您当前的位置：首页 > 新闻动态 > 行业资讯\n上一篇：公司参加2024年行业展会\n下一篇：新品发布会圆满结束\n"
                   "版权所有 © 2024 某某科技有限公司\n备案号：京ICP备12345678号"),
    "copyright footer": ("boilerplate",
                         "本周末市图书馆将举办一场关于地方历史的讲座，欢迎市民朋友们带着孩子一起参加，现场还有免费的茶点。\n"
                         "本文来源于网络，版权所有归原作者，如有侵权请联系我们删除。\n免责声明：本站内容仅供参考。\n"
                         "扫描二维码，关注我们的公众号。\n返回顶部\n版权所有 © 2010-2024 某某网 All Rights Reserved"),
    "same line repeated": ("repetition", "\n".join(["点击领取新人红包，限时优惠，先到先得！"] * 15)),
    "same price line repeated": ("repetition", "\n".join(["特价促销：原价299元，现价只要99元，欢迎新老顾客选购！"] * 10)),
    "symbol soup": ("symbols",
                    "★★★★★【热门推荐】★★★★★\n◆◆◆ 最新 ◆◆◆ →→→ 点这里 ←←←\n※※※ 精彩内容 ※※※ ●●●●●●\n"
                    "☆☆☆【独家】☆☆☆ ■■■■ □□ ▲▲▲▲ ▼▼▼▼\n★☆★☆★☆ 好消息 ★☆★☆★☆ ♥♥♥♥♥ ♪♪♪"),
    "hashtag soup": ("symbols", "今日热点 #热搜# #明星# #八卦# #娱乐# #新闻# #头条# #爆料# #独家# #推荐# " * 3),
    "keyword stuffing": ("repetition",
                         "手机壳 苹果手机壳 华为手机壳 小米手机壳 手机壳批发 手机壳定制 手机壳图片 2024新款手机壳 "
                         "手机壳价格 手机壳厂家 手机壳品牌 手机壳推荐 手机壳排行榜 手机壳哪个好 便宜手机壳"),
    "noun list": ("stop_words",
                  "苹果香蕉葡萄西瓜桃子，梨子樱桃草莓柠檬芒果。汽车火车公交轮船飞机，自行车卡车货船。红色蓝色绿色黄色紫色，"
                  "橙色粉色棕色灰色黑色。春夏秋冬，东南西北，山川河流湖泊海洋。"),
    "page of lone numbers": ("alpha", "第1页\n" + "\n".join(str(i) for i in range(1, 121)) + "\n下一页"),
    "teaser list": ("bullets_ellipsis", "\n".join(f"{t}……" for t in (
        "震惊！这个小区的居民发现了一件怪事，原来是", "专家提醒：每天早上喝一杯水的人，身体会发生",
        "三十岁以后一定要知道的十个秘密，第五个让人", "她辞职去农村养猪，一年以后所有人都没有想到",
        "孩子放学回家说了一句话，妈妈听完以后立刻"))),
    "menu lines": ("terminal_punct", "热门文章\n最新评论\n网站地图\n友情链接\n合作伙伴\n人才招聘\n广告服务\n"
                                     "意见反馈\n帮助中心\n常见问题\n下载客户端\n手机版\n电脑版\n繁體中文\n切换城市\n站长统计"),
    "one-line ad": ("length", "加微信：vip8888，领红包！"),
}


@pytest.mark.parametrize("name", list(JUNK))
def test_each_chinese_junk_page_is_removed_by_its_filter(name):
    meant, text = JUNK[name]
    assert detect_language(text) == "zh", name
    assert FILTERS[meant](text, "zh", units(text, "zh"), FilterConfig()) is not None, f"{meant} kept {name}"
    assert first_failure(text, "zh") is not None


def test_short_poems_are_verse_and_pass_but_junk_is_not_verse():
    quatrain = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"        # 20 characters, no function words
    ci = "长相思。\n长相思。\n若问相思甚了期。\n除非相见时。\n长相思。\n长相思。\n欲把相思说似谁。\n浅情人不知。"
    assert is_verse(quatrain, "zh") and is_verse(ci, "zh")
    assert first_failure(quatrain, "zh") is None and first_failure(ci, "zh") is None
    assert first_failure("楓落吳江冷。", "zh")[0] == "length"     # one line of a lost poem is not a document
    for name in ("navigation", "keyword stuffing", "noun list", "menu lines", "page of lone numbers"):
        assert not is_verse(JUNK[name][1], "zh"), name
    assert not is_verse("The cat sat on the mat, and then it slept.", "en")


@pytest.fixture(scope="module")
def chinese_corpora():
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (developer and CI machines have it beside the checkout)")
    return _filter_rates().corpora(SHARED_DATA)


@pytest.mark.parametrize("corpus, every", [("novels", 10), ("verse", 6), ("prose", 3)])
def test_good_chinese_text_passes_at_98_percent(chinese_corpora, corpus, every):
    """Every 10th novel passage, 6th poem, 3rd prose passage (about 2,300 documents, a few seconds)."""
    docs = chinese_corpora[corpus][::every]
    assert len(docs) >= 250
    if corpus != "verse":
        assert min(map(len, docs)) >= 200
    rates = _filter_rates().removal_rates(docs)
    assert rates["passed"] >= 0.98, (corpus, rates)


def test_clean_command_keeps_poems_and_removes_junk(tmp_path, capsys):
    poems = ["白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
             "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
             "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。",
             "关关雎鸠，在河之洲。窈窕淑女，君子好逑。\n参差荇菜，左右流之。窈窕淑女，寤寐求之。\n"
             "求之不得，寤寐思服。悠哉悠哉，辗转反侧。\n参差荇菜，左右采之。窈窕淑女，琴瑟友之。\n"
             "参差荇菜，左右芼之。窈窕淑女，钟鼓乐之。"]
    junk = [text for _, text in JUNK.values()]
    src = tmp_path / "pages.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in poems + junk), encoding="utf-8")
    out = tmp_path / "clean"
    assert cli_main(["data", "clean", "--input", str(src), "--out", str(out), "--lang", "zh"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["docs_in"] == len(poems) + len(junk)
    assert report["docs_out"] == len(poems)
    assert sum(r["docs"] for r in report["removed"].values()) == len(junk)     # every junk page counted
    kept = [json.loads(l)["text"] for l in (out / "clean-00000-of-00001.jsonl").read_text(encoding="utf-8").splitlines()]
    assert kept == poems
    assert f"out: {len(poems)} documents" in capsys.readouterr().out
