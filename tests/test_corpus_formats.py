"""Data at real scale (issue 15), corpora as they come: near-duplicates are found in scripts written
without spaces (Chinese, Japanese, Thai) as in English, and distinct documents are kept; compressed
JSONL and text (.gz, .zst), parquet shards, Hugging Face save_to_disk folders and several URLs are
read as what they are, end to end through prepare.py."""

import functools
import gzip
import http.server
import json
import os
import random
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

import corpus
import data
from test_prepare import documents, load, prepare, sentences

# ----------------------------------------------------------------------------- text, written here
# Documents are seeded draws of these sentences: two documents of one language share words, phrases
# and often whole sentences (a hard case for precision), and no download is needed.
ZH = """今天早上下了一场大雨，街上的行人都撑着伞匆匆忙忙地赶去上班。
我们学校的图书馆新买了很多关于历史和地理的书，同学们都很喜欢去那里看书。
这座城市的地铁线路越来越多，从东边到西边只需要四十分钟。
他每天晚上都会花一个小时练习写汉字，希望明年能通过考试。
春天来了，公园里的花都开了，很多老人在湖边散步聊天。
妈妈说周末要带我们去乡下看望外婆，顺便摘一些新鲜的水果。
研究人员发现，每天坚持运动半个小时可以明显改善睡眠质量。
这家小饭馆的面条做得特别好吃，中午常常要排队才能吃到。
因为天气太热，很多人选择在家里开着空调看电视。
老师提醒大家考试前要好好复习，不要等到最后一天才开始准备。
火车站附近新开了一家书店，里面还有一个安静的咖啡角。
我的朋友最近在学习做饭，他说自己已经会做十几道家常菜了。
这个周末的足球比赛非常精彩，双方一直打到最后一分钟才分出胜负。
随着手机支付的普及，越来越多的小商店不再收现金。
冬天的早晨非常冷，孩子们穿着厚厚的衣服走路去上学。
公司决定明年在南方开设一个新的工厂，预计会增加两百个工作岗位。
她从小就喜欢画画，现在已经在美术学院读三年级了。
山上的空气很清新，我们在山顶看到了美丽的日出。
经过几个月的努力，这个项目终于按时完成了。
爷爷每天早上都会在院子里打太极拳，身体一直很健康。
这条河以前污染很严重，经过治理以后河水变得清澈了。
我们在网上订了两张电影票，晚上七点半开始放映。
新闻报道说，今年的粮食产量比去年提高了百分之五。
他把旧自行车修好以后送给了邻居家的小孩。
医生建议病人多喝水，少吃油腻的食物，按时休息。
博物馆里展出了很多古代的瓷器和字画，吸引了大批游客。
下班的时候路上堵车很厉害，我只好改坐地铁回家。
这本小说讲的是一个年轻人离开家乡去大城市打拼的故事。
学生们在实验室里认真地观察植物的生长过程。
晚饭以后，一家人坐在客厅里一边吃水果一边聊天。
市政府计划在河边修建一条长长的自行车道。
由于大雪，机场取消了很多航班，不少旅客只能在候机厅过夜。
她每个月都会把一部分工资存起来，准备将来出国留学。
小狗在草地上跑来跑去，追着一个红色的皮球。
这次会议讨论了如何减少塑料垃圾和保护海洋环境。
农民们正在田里收割稻谷，脸上露出了丰收的笑容。
我第一次坐高铁的时候，觉得速度快得让人难以相信。
社区里的志愿者每周六都会去看望独自生活的老人。
他在日记里写下了这次旅行中遇到的每一个有趣的人。
为了准备比赛，队员们每天下午都在操场上训练三个小时。
夜晚的城市灯火通明，高楼大厦在河面上留下美丽的倒影。
这位作家的新书刚出版一个星期就卖出了十万本。
邻居家的阿姨很会包饺子，过年的时候总会送给我们一大盘。
科学家们希望通过新的技术更准确地预测地震。
秋天的树叶变成了金黄色，风一吹就落满了小路。
我们班的同学打算在毕业前一起去海边旅行。
这家医院最近引进了一批先进的医疗设备。
孩子们在雪地里堆了一个大雪人，还给它戴上了一顶帽子。""".split('\n')

EN = """It rained heavily this morning, and people hurried to work under their umbrellas.
Our school library bought many new books about history and geography, and students love to read there.
The city keeps adding subway lines, and crossing from east to west now takes only forty minutes.
He spends an hour every evening practising his handwriting, hoping to pass the exam next year.
Spring has come, the flowers in the park are open, and old people chat as they walk by the lake.
Mother says that on the weekend we will visit grandmother in the country and pick some fresh fruit.
Researchers found that half an hour of exercise a day clearly improves the quality of sleep.
The noodles at this little restaurant are so good that at noon you often have to queue for them.
Because the weather is so hot, many people stay at home with the air conditioning on and watch television.
The teacher reminded everyone to revise well before the exam instead of starting on the last day.
A new bookshop has opened near the railway station, and it has a quiet corner for coffee.
My friend has been learning to cook, and he says he can already make a dozen simple dishes.
The football match this weekend was thrilling, and the winner was only decided in the final minute.
As paying by phone spreads, more and more small shops no longer accept cash.
Winter mornings are very cold, and the children walk to school in thick coats.
The company decided to open a new factory in the south next year, which should add two hundred jobs.
She has loved drawing since she was small and is now in her third year at the art academy.
The air on the mountain was fresh, and from the summit we watched a beautiful sunrise.
After several months of hard work, the project was finally finished on time.
Grandfather practises tai chi in the yard every morning and has always been in good health.
This river used to be badly polluted, but after the cleanup its water became clear again.
We booked two cinema tickets online for the show that starts at half past seven.
The news reported that this year's grain harvest was five percent larger than last year's.
He repaired his old bicycle and gave it to the little boy next door.
The doctor advised the patient to drink more water, eat less greasy food and rest regularly.
The museum shows many ancient porcelain pieces and paintings, and it draws crowds of visitors.
The traffic was terrible on the way home from work, so I took the subway instead.
This novel tells the story of a young man who leaves his home town to make a living in a big city.
In the laboratory the students carefully observed how the plants grew from day to day.
After dinner the whole family sat in the living room, eating fruit and talking.
The city government plans to build a long cycle path along the river.
Heavy snow forced the airport to cancel many flights, and some travellers spent the night in the terminal.
Every month she saves part of her salary so that she can study abroad one day.
The puppy ran back and forth across the lawn, chasing a red rubber ball.
The meeting discussed how to reduce plastic waste and protect the oceans.
The farmers were harvesting rice in the fields, smiling at the good harvest.
The first time I rode a high speed train, its speed was hard to believe.
Volunteers from the neighbourhood visit old people who live alone every Saturday.
In his diary he wrote about every interesting person he met on the journey.
To prepare for the tournament, the players train on the sports field for three hours every afternoon.
At night the city is brightly lit, and the tall buildings are reflected in the river.
The writer's new book sold a hundred thousand copies in its first week.
The lady next door makes wonderful dumplings and always brings us a big plate at the new year.
Scientists hope that new technology will let them predict earthquakes more accurately.
In autumn the leaves turn golden, and a gust of wind covers the path with them.
The students in our class plan to travel to the seaside together before they graduate.
This hospital has recently bought a set of modern medical equipment.
The children built a big snowman in the snow and put a hat on its head.""".split('\n')

JA = """今日は朝から雨が降っていて、駅まで歩くのが大変でした。
週末に友達と一緒に新しくできたカフェへ行きました。
図書館で日本の歴史についての本を三冊借りました。
夏休みには家族で北海道へ旅行する予定です。
毎朝七時に起きて、公園を三十分ぐらい散歩しています。
このレストランのラーメンはとてもおいしいので、いつも混んでいます。
来月の試験のために、毎晩二時間ずつ勉強しています。
電車が遅れたので、会議に少し遅刻してしまいました。
祖母は庭でいろいろな野菜を育てています。
桜の季節になると、たくさんの人が川沿いで花見を楽しみます。
新しいスマートフォンを買ったけれど、使い方がまだよく分かりません。
子供たちは雪が降ったのを見て、とても喜んでいました。
駅の近くに大きな本屋があって、週末はいつも人でいっぱいです。
弟はサッカーが大好きで、毎日学校の後に練習しています。
先生は学生たちに、分からないことがあれば遠慮せずに質問するように言いました。
山の上から見た夕日は、言葉にできないほど美しかったです。""".split('\n')

TH = """วันนี้ฝนตกหนักมากตั้งแต่เช้า ทำให้รถติดบนถนนหลายสาย
ฉันชอบไปอ่านหนังสือที่ห้องสมุดใกล้บ้านในวันหยุดสุดสัปดาห์
คุณยายปลูกผักและผลไม้หลายชนิดไว้ในสวนหลังบ้าน
นักเรียนทุกคนตั้งใจเรียนเพื่อเตรียมตัวสอบปลายภาค
ร้านอาหารเล็กๆ ร้านนี้มีก๋วยเตี๋ยวที่อร่อยที่สุดในซอย
พวกเราวางแผนจะไปเที่ยวทะเลกันในช่วงปิดเทอมนี้
รถไฟฟ้าสายใหม่ช่วยให้การเดินทางในเมืองสะดวกขึ้นมาก
คุณหมอแนะนำให้ดื่มน้ำมากๆ และพักผ่อนให้เพียงพอ
ตลาดนัดตอนเย็นมีของกินและเสื้อผ้าราคาถูกมากมาย
น้องชายของฉันชอบเล่นฟุตบอลกับเพื่อนๆ หลังเลิกเรียน
ในฤดูหนาวอากาศบนภูเขาทางภาคเหนือเย็นสบายมาก
บริษัทของเขากำลังจะเปิดสาขาใหม่ที่เชียงใหม่ในปีหน้า
แม่ทำแกงเขียวหวานไก่ให้ทุกคนกินเป็นอาหารเย็น
เด็กๆ วิ่งเล่นกันอย่างสนุกสนานในสวนสาธารณะ
พิพิธภัณฑ์แห่งนี้จัดแสดงเครื่องปั้นดินเผาโบราณจำนวนมาก
หลังจากทำงานหนักมาทั้งปี เขาก็ได้ไปพักผ่อนที่เกาะสมุย""".split('\n')

PUNCTUATION = set('，。、 ')
EN_WORDS = sorted(set(' '.join(EN).split()))


def letters(pool):
    return sorted(set(''.join(pool)) - PUNCTUATION)


def synthetic_docs(pool, n, per_doc, seed, sep=''):
    """n documents of one language and style, each per_doc=(lo, hi) sentences drawn from pool."""
    rng = random.Random(seed)
    return [sep.join(rng.sample(pool, rng.randint(*per_doc))) for _ in range(n)]


def changed(doc, fraction, rng, vocab, english=False, in_one_place=False):
    """doc with `fraction` of its words (english) or of its characters (punctuation aside) replaced
    by others from vocab: at random places, or in one run (an edited phrase)."""
    tokens = doc.split(' ') if english else list(doc)
    places = [i for i, t in enumerate(tokens) if t not in PUNCTUATION]
    k = max(1, round(fraction * len(places)))
    if in_one_place:
        start = rng.randrange(len(places) - k)
        chosen = places[start:start + k]
    else:
        chosen = rng.sample(places, k)
    for i in chosen:
        tokens[i] = rng.choice([v for v in vocab if v != tokens[i]])
    return (' ' if english else '').join(tokens)


def similarity(a, b, num_perm=256):
    sigs, _ = corpus.minhash_signatures([a, b], num_perm=num_perm)
    return float(np.mean(sigs[0] == sigs[1]))


def dedup(originals, copies):
    """At the default threshold: (recall: the share of copies dropped as near-duplicates of their
    original, the number of originals dropped, the largest estimated similarity of two originals)."""
    keep = corpus.NearDuplicates().keep(originals + copies)
    sigs, _ = corpus.minhash_signatures(originals)
    same = (sigs[:, None, :] == sigs[None, :, :]).mean(-1)
    np.fill_diagonal(same, 0)
    return 1 - np.mean(keep[len(originals):]), len(originals) - sum(keep[:len(originals)]), float(same.max())


# ----------------------------------------------------------------------------- near-duplicates

def test_script_classes_split_spaced_words_from_characters_of_unspaced_scripts():
    text = 'Naïve café 한국어 中文，日本語のかな。ภาษาไทย “quoted”\u00a0x_1 ｶﾀ'
    cls = corpus.script_classes(np.array([ord(c) for c in text.lower()]))
    # Latin, Hangul: words (1); Han, kana: a token each (2); Thai: a token each (3); punctuation, spaces (0)
    assert ''.join(map(str, cls)) == '111110111101110220222222033333330011111100111022'


def test_one_changed_character_leaves_a_chinese_document_as_similar_as_one_changed_word_leaves_english():
    rng = random.Random(0)
    zh = synthetic_docs(ZH, 1, (25, 25), 1)[0]
    en = synthetic_docs(EN, 1, (6, 6), 1, ' ')[0]
    assert len(zh) >= 600 and len(en.split()) >= 100
    zh2, en2 = changed(zh, 0, rng, letters(ZH)), changed(en, 0, rng, EN_WORDS, english=True)  # one token each
    assert sum(a != b for a, b in zip(zh, zh2)) == 1 and sum(a != b for a, b in zip(en.split(), en2.split())) == 1
    # the estimate tracks the Jaccard similarity of character 3-grams (Chinese) and word 5-grams (English)
    grams = lambda seq, n: {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}
    jaccard = lambda a, b: len(a & b) / len(a | b)
    chars = lambda t: [c for c in t if c not in PUNCTUATION]
    true_zh = jaccard(grams(chars(zh), 3), grams(chars(zh2), 3))
    words = lambda t: re.findall(r'[0-9a-z_]+', t.lower())
    true_en = jaccard(grams(words(en), 5), grams(words(en2), 5))
    assert true_zh > 0.98 and true_en > 0.9  # a whole run of Chinese used to be one "word": similarity 0.0
    assert abs(similarity(zh, zh2) - true_zh) < 0.05 and abs(similarity(en, en2) - true_en) < 0.07
    for pool, vocab in ((JA, letters(JA)), (TH, letters(TH))):  # Japanese, Thai: alike
        doc = ''.join(pool[:8])
        assert similarity(doc, changed(doc, 0, rng, vocab)) > 0.9
        assert similarity(doc, ''.join(pool[8:])) < 0.2


def test_near_dedup_recall_on_planted_chinese_and_english_near_duplicates_and_no_false_pairs():
    # 5 corpora of 100 documents per language, each document with a copy: 1% to 3% of its characters
    # (Chinese) changed at random places or in one place, 1% to 3% of its words (English) changed in one
    # place, or 1% at random places. (English words scattered at 2-3% leave a Jaccard similarity of
    # word 5-grams of 0.82-0.75: at or below the threshold, so such copies are not near-duplicates at 0.8.)
    n, rng = 100, random.Random(0)
    fractions = np.linspace(0.01, 0.03, n)
    found = {}
    for seed in range(5):
        zh, en = synthetic_docs(ZH, n, (20, 28), seed), synthetic_docs(EN, n, (6, 9), seed, ' ')
        assert 450 < np.mean([len(d) for d in zh]) < 700  # ~600 characters
        planted = {
            'zh, 1-3% of characters at random places': (zh, [changed(d, f, rng, letters(ZH))
                                                             for d, f in zip(zh, fractions)]),
            'zh, 1-3% of characters in one place': (zh, [changed(d, f, rng, letters(ZH), in_one_place=True)
                                                         for d, f in zip(zh, fractions)]),
            'en, 1-3% of words in one place': (en, [changed(d, f, rng, EN_WORDS, english=True, in_one_place=True)
                                                    for d, f in zip(en, fractions)]),
            'en, 1% of words at random places': (en, [changed(d, 0.01, rng, EN_WORDS, english=True) for d in en]),
        }
        for what, (originals, copies) in planted.items():
            recall, originals_dropped, closest = dedup(originals, copies)
            assert originals_dropped == 0 and closest < 0.8, what  # distinct documents of one style: all kept
            found.setdefault(what, []).append(recall)
        assert all(corpus.NearDuplicates().keep(zh + en))  # the two languages in one index: no pair either
    for what, recalls in found.items():
        print(f"{what}: recall {np.mean(recalls):.3f} of {5 * n} pairs "
              f"(per corpus {min(recalls):.2f}-{max(recalls):.2f})")
        assert np.mean(recalls) >= 0.9, what


def test_japanese_and_thai_near_duplicates_are_dropped_and_distinct_documents_kept():
    rng = random.Random(3)
    for pool in (JA, TH):
        docs = [''.join(pool[i:i + 4]) for i in range(0, 16, 4)]  # four documents, no sentence shared
        copies = [changed(d, 0.01, rng, letters(pool)) for d in docs]
        assert corpus.NearDuplicates().keep(docs + copies) == [True] * 4 + [False] * 4


def test_a_signature_does_not_depend_on_its_batch_in_any_script():
    docs = [synthetic_docs(ZH, 1, (3, 3), 4)[0], synthetic_docs(EN, 1, (2, 2), 4, ' ')[0], TH[0], JA[0],
            ZH[0] + ' Python 3.11 ' + EN[0] + ' ' + ZH[1], 'x', '', '，。']
    sigs, has_words = corpus.minhash_signatures(docs)
    assert has_words.tolist() == [True] * 6 + [False, False]
    for i, doc in enumerate(docs):
        alone, _ = corpus.minhash_signatures([doc])
        assert np.array_equal(alone[0], sigs[i])


def test_prepare_drops_planted_chinese_near_duplicates_from_a_zstd_jsonl_source(tmp_path):
    pa = pytest.importorskip('pyarrow')
    rng = random.Random(5)
    originals = synthetic_docs(ZH, 40, (20, 28), 6)
    copies = [changed(d, 0.01, rng, letters(ZH)) for d in originals]
    src = tmp_path / 'zh.jsonl.zst'
    with pa.output_stream(str(src), compression='zstd') as f:
        f.write(''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in originals + copies).encode())
    prepare(tmp_path, '--dataset=zh', f'--sources={src}', '--vocab_size=300')
    meta, stats, tok, split = load(tmp_path, 'zh')
    s = stats['sources'][str(src)]
    assert s['docs_in'] == 80 and s['dropped']['near_duplicate'] == 40 and s['docs_out'] == 40
    assert sorted(documents(tok, split['train']) + documents(tok, split['val'])) == sorted(originals)


# ----------------------------------------------------------------------------- compressed files

def write_gzip(path, text, members=2):
    """text as `members` concatenated gzip members (as `cat a.gz b.gz` or pigz make)."""
    raw = text.encode('utf-8')
    cut = len(raw) // members
    parts = [raw[i * cut:(i + 1) * cut if i < members - 1 else len(raw)] for i in range(members)]
    path.write_bytes(b''.join(gzip.compress(p) for p in parts))
    return str(path)


def write_zstd(path, text, frames=2):
    """text as `frames` concatenated Zstandard frames (pyarrow's codec)."""
    pa = pytest.importorskip('pyarrow')
    raw = text.encode('utf-8')
    cut = len(raw) // frames
    parts = [raw[i * cut:(i + 1) * cut if i < frames - 1 else len(raw)] for i in range(frames)]
    path.write_bytes(b''.join(pa.Codec('zstd').compress(p, asbytes=True) for p in parts))
    return str(path)


def jsonl(docs):
    return ''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in docs)


def test_gzip_and_zstd_jsonl_and_text_read_as_what_they_hold(tmp_path):
    docs = ZH[:3] + EN[:3]
    as_text = '\n<|endoftext|>\n'.join(docs)
    for path in (write_gzip(tmp_path / 'a.jsonl.gz', jsonl(docs)), write_zstd(tmp_path / 'a.jsonl.zst', jsonl(docs)),
                 write_zstd(tmp_path / 'a.jsonl.zstd', jsonl(docs), frames=1)):
        assert list(corpus.read_file(path)) == docs, path
    for path in (write_gzip(tmp_path / 'a.txt.gz', as_text), write_zstd(tmp_path / 'a.txt.zst', as_text)):
        assert [d.strip() for d in corpus.read_file(path)] == docs, path
    # a bad line inside a compressed file is named by its line, as in a plain one
    bad = write_gzip(tmp_path / 'bad.jsonl.gz', jsonl(docs[:2]) + '{"txt": "x"}\n' + jsonl(docs[2:]), members=1)
    with pytest.raises(data.DataError, match=r"bad.jsonl.gz:3: field 'text'"):
        list(corpus.read_file(bad))
    dropped = []
    assert list(corpus.read_file(bad, skip_bad_lines=True, bad=dropped)) == docs and len(dropped) == 1


def test_a_file_compressed_by_the_zstd_command_line_tool_reads(tmp_path):
    if shutil.which('zstd') is None:
        pytest.skip('no zstd command on this machine (pyarrow-written .zst files are tested above)')
    pytest.importorskip('pyarrow')
    plain = tmp_path / 'a.jsonl'
    plain.write_text(jsonl(EN * 20), encoding='utf-8')
    subprocess.run(['zstd', '-q', '-19', str(plain), '-o', str(tmp_path / 'a.jsonl.zst')], check=True)
    assert list(corpus.read_file(str(tmp_path / 'a.jsonl.zst'))) == EN * 20


def test_a_corrupt_or_cut_short_compressed_file_is_an_error_naming_it(tmp_path):
    whole = gzip.compress(jsonl(EN * 50).encode())
    (tmp_path / 'cut.jsonl.gz').write_bytes(whole[:len(whole) // 2])  # an interrupted download
    (tmp_path / 'plain.txt.gz').write_text('not gzip at all\n')
    write_zstd(tmp_path / 'whole.zst', jsonl(EN * 50), frames=1)
    (tmp_path / 'cut.jsonl.zst').write_bytes((tmp_path / 'whole.zst').read_bytes()[:200])
    for name in ('cut.jsonl.gz', 'plain.txt.gz', 'cut.jsonl.zst'):
        with pytest.raises(data.DataError, match=rf"{name}: cannot decompress it as (gzip|zstd) after line .*cut sh"):
            list(corpus.iter_documents([str(tmp_path / name)]))
    proc = prepare(tmp_path, '--dataset=cut', f"--sources={tmp_path / 'cut.jsonl.gz'}", check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'cut.jsonl.gz: cannot decompress it as gzip' in proc.stderr.strip().splitlines()[-1]


def test_prepare_reads_compressed_jsonl_and_text_sources_and_a_directory_of_them(tmp_path):
    pytest.importorskip('pyarrow')
    docs = sentences(50, 7)  # distinct: near-dedup keeps them all
    folder = tmp_path / 'shards'
    (folder / 'more').mkdir(parents=True)
    sources = [write_gzip(tmp_path / 'a.jsonl.gz', jsonl(docs[:10])),
               write_zstd(tmp_path / 'b.jsonl.zst', jsonl(docs[10:20])),
               write_gzip(tmp_path / 'c.txt.gz', '\n<|endoftext|>\n'.join(docs[20:30])),
               write_zstd(tmp_path / 'd.txt.zst', '\n<|endoftext|>\n'.join(docs[30:40])), str(folder)]
    write_gzip(folder / '0.jsonl.gz', jsonl(docs[40:45]))
    write_zstd(folder / 'more' / '1.txt.zst', '\n<|endoftext|>\n'.join(docs[45:]))
    (folder / 'notes.gz').write_bytes(gzip.compress(b'not a corpus file: no .txt/.jsonl inside the name'))
    assert corpus.resolve_source(str(folder), str(tmp_path))[1] == [str(folder / '0.jsonl.gz'),
                                                                  str(folder / 'more' / '1.txt.zst')]
    prepare(tmp_path, '--dataset=packed', f"--sources={','.join(sources)}", '--vocab_size=300')
    meta, stats, tok, split = load(tmp_path, 'packed')
    assert [s['docs_out'] for s in stats['sources'].values()] == [10, 10, 10, 10, 10]
    assert all(s['bad_lines'] == 0 for s in stats['sources'].values())
    assert sorted(d.strip() for d in documents(tok, split['train']) + documents(tok, split['val'])) == sorted(docs)


# ----------------------------------------------------------------------------- parquet shards

def test_a_directory_of_parquet_shards_reads_every_shard_in_sorted_order(tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    docs = sentences(60, 8)
    folder = tmp_path / 'fineweb'
    folder.mkdir()
    for k in (2, 0, 1):  # written out of order; read shard_00000, shard_00001, shard_00002
        table = pa.table({'id': list(range(20 * k, 20 * k + 20)), 'text': docs[20 * k:20 * k + 20]})
        pq.write_table(table, folder / f'shard_{k:05d}.parquet', row_group_size=7)  # several row groups a shard
    where, files = corpus.resolve_source(str(folder), str(tmp_path))
    assert files == [str(folder / f'shard_{k:05d}.parquet') for k in range(3)]
    assert list(corpus.iter_documents(files)) == docs
    prepare(tmp_path, '--dataset=shards', f'--sources={folder}', '--vocab_size=300')
    meta, stats, tok, split = load(tmp_path, 'shards')
    s = stats['sources'][str(folder)]
    assert s['files'] == 3 and s['docs_in'] == s['docs_out'] == 60
    assert sorted(documents(tok, split['train']) + documents(tok, split['val'])) == sorted(docs)


# ----------------------------------------------------------------------------- Hugging Face save_to_disk

@pytest.fixture
def hf_datasets():
    datasets = pytest.importorskip('datasets')
    datasets.disable_progress_bars()
    return datasets


def test_a_save_to_disk_folder_reads_its_text_column_as_load_from_disk_does(tmp_path, hf_datasets):
    docs = [f'{i}: {d}' for i, d in enumerate(synthetic_docs(ZH, 30, (2, 4), 9))]
    ds = hf_datasets.Dataset.from_dict({'text': docs, 'url': [f'https://example.com/{i}' for i in range(30)]})
    ds.shuffle(seed=0).save_to_disk(str(tmp_path / 'saved'), num_shards=3)  # an index mapping, flattened on save
    where, files = corpus.resolve_source(str(tmp_path / 'saved'), str(tmp_path))
    assert 'save_to_disk' in where and [os.path.basename(f) for f in files] == [f'data-0000{k}-of-00003.arrow'
                                                                                for k in range(3)]
    assert list(corpus.iter_documents(files)) == list(hf_datasets.load_from_disk(str(tmp_path / 'saved'))['text'])


def test_a_datasetdict_folder_reads_its_train_split_and_says_so(tmp_path, hf_datasets, capsys):
    train, test = sentences(40, 10), sentences(5, 11)
    hf_datasets.DatasetDict({'train': hf_datasets.Dataset.from_dict({'text': train}),
                             'test': hf_datasets.Dataset.from_dict({'text': test})}).save_to_disk(str(tmp_path / 'dd'))
    where, files = corpus.resolve_source(str(tmp_path / 'dd'), str(tmp_path))
    out = capsys.readouterr().out
    assert "splits train, test; reading 'train'" in out and f"--sources={tmp_path / 'dd' / 'test'}" in out
    assert list(corpus.iter_documents(files)) == train
    assert list(corpus.iter_documents(corpus.resolve_source(str(tmp_path / 'dd' / 'test'), str(tmp_path))[1])) == test
    proc = prepare(tmp_path, '--dataset=dd', f"--sources={tmp_path / 'dd'}", '--vocab_size=300')
    assert "reading 'train'" in proc.stdout
    meta, stats, tok, split = load(tmp_path, 'dd')
    assert stats['sources'][str(tmp_path / 'dd')]['docs_out'] == 40
    assert sorted(documents(tok, split['train']) + documents(tok, split['val'])) == sorted(train)
    # a DatasetDict without 'train' is refused with the splits it has
    hf_datasets.DatasetDict({'validation': hf_datasets.Dataset.from_dict({'text': test})}).save_to_disk(
        str(tmp_path / 'val_only'))
    with pytest.raises(SystemExit, match=r"without a 'train' split \(it has validation\).*val_only/validation"):
        corpus.resolve_source(str(tmp_path / 'val_only'), str(tmp_path))


def test_a_saved_dataset_without_text_or_with_null_rows_names_file_row_and_field(tmp_path, hf_datasets):
    hf_datasets.Dataset.from_dict({'content': ['a', 'b']}).save_to_disk(str(tmp_path / 'no_text'))
    files = corpus.resolve_source(str(tmp_path / 'no_text'), str(tmp_path))[1]
    with pytest.raises(data.DataError, match=r"data-00000-of-00001.arrow: no 'text' column \(it has content\)"):
        list(corpus.iter_documents(files))
    hf_datasets.Dataset.from_dict({'text': ['first document', None, 'third document']}).save_to_disk(
        str(tmp_path / 'nulls'))
    files = corpus.resolve_source(str(tmp_path / 'nulls'), str(tmp_path))[1]
    with pytest.raises(data.DataError, match=r"data-00000-of-00001.arrow: row 1 \(counting from 0\): field 'text': "
                                             r"expected a string, got null"):
        list(corpus.iter_documents(files))
    counts = {}
    assert list(corpus.iter_documents(files, skip_bad_lines=True, counts=counts)) == ['first document', 'third document']
    assert counts['bad_lines'] == 1
    os.remove(files[0])  # a save that lost a file is refused before reading anything
    with pytest.raises(SystemExit, match=r"state.json lists .*data-00000-of-00001.arrow, which is missing"):
        corpus.resolve_source(str(tmp_path / 'nulls'), str(tmp_path))


# ----------------------------------------------------------------------------- several URLs

class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet, but count the requests
        self.server.requests.append(self.path)


@pytest.fixture
def web(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Files, directory=str(root)))
    server.daemon_threads, server.requests = True, []
    server.root, server.url = root, f'http://127.0.0.1:{server.server_address[1]}'
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_several_parquet_shard_urls_download_each_to_its_own_file_and_all_are_read(tmp_path, web):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    docs, more = sentences(45, 12), sentences(10, 13)
    for k, folder in enumerate(('main', 'main', 'mirror')):  # two FineWeb-style shards, and one of the same name
        os.makedirs(web.root / folder, exist_ok=True)
        name = f'shard_{k % 2:05d}.parquet'
        pq.write_table(pa.table({'text': docs[15 * k:15 * k + 15]}), web.root / folder / name)
    urls = [f'{web.url}/main/shard_00000.parquet', f'{web.url}/main/shard_00001.parquet',
            f'{web.url}/mirror/shard_00000.parquet']
    write_gzip(web.root / 'web.jsonl.gz', jsonl(more))
    urls.append(f'{web.url}/web.jsonl.gz')
    prepare(tmp_path, '--dataset=web', f"--sources={','.join(urls)}", '--vocab_size=300')
    downloads = sorted(os.listdir(tmp_path / 'downloads'))
    assert len(downloads) == 4 and len(web.requests) == 4
    assert [d.split('-')[0] for d in downloads] == ['shard_00000', 'shard_00000', 'shard_00001', 'web']
    assert downloads[-1].endswith('.jsonl.gz')  # kept whole: read as the compressed JSONL it is
    meta, stats, tok, split = load(tmp_path, 'web')
    assert [stats['sources'][u]['docs_out'] for u in urls] == [15, 15, 15, 10]
    got = documents(tok, split['train']) + documents(tok, split['val'])
    assert sorted(got) == sorted(docs + more)
    prepare(tmp_path, '--dataset=web', f"--sources={','.join(urls)}", '--vocab_size=300')
    assert len(web.requests) == 4  # cached: the second run asks the server nothing
